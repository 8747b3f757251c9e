"""Our RL and distillation losses against TRL's own implementation on identical inputs: loss AND gradient.

TRL is a test-only reference (requirements-test.txt pins the version whose internals these calls rely
on). TRL computes most of these losses inside trainer methods, so each test builds the smallest
trainer-free call it can, and says how:
    - GRPO / GSPO / CISPO: the unbound GRPOTrainer._compute_loss(stub, model, inputs), where the stub
      holds only the attributes the method reads and its _get_per_token_logps_and_entropies returns
      our leaf log-prob tensor, so autograd reaches it through TRL's arithmetic.
    - RLOO advantages: TRL computes them inline in RLOOTrainer._generate_and_score_completions, so
      the test executes that method's own source lines, from "# Include the KL penalty in the reward"
      to the nan_to_num of the advantages, on our tensors (and fails loudly if the lines move).
    - GKD: GKDTrainer.generalized_jsd_loss is a staticmethod (full logits), and DistillationTrainer's
      module-level _chunked_divergence_loss takes hidden states and lm_head weights like ours.
    - On-policy distillation: TRL has no importance-sampling OPD; IWOPDTrainer._compute_iw_opd_loss
      (stub self) with iw_opd_gamma = 0 is the same advantage in a REINFORCE loss −A·log π, so at the
      first on-policy step (ratio 1) the gradients must agree; the values differ by design (ours is
      −mean(r·A), TRL's −mean(A·log π)).
"""
import inspect
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from losses.advantages import kl_in_reward, rloo_advantages  # noqa: E402
from losses.cispo import cispo_loss  # noqa: E402
from losses.distill import gkd_loss, opd_loss  # noqa: E402
from losses.grpo import grpo_loss  # noqa: E402
from losses.gspo import gspo_loss  # noqa: E402

T64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=T64)


class _Accelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_grpo_loss(logps, old, adv, mask, *, loss_type, level="token", epsilon_low=0.2, epsilon_high=0.2,
                  max_completion_length=None, num_items_in_batch=None):
    """GRPOTrainer._compute_loss on a stub (β = 0, no vLLM, no entropy mask/bonus, one process, no accumulation)."""
    from trl import GRPOTrainer
    N, T = logps.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=0.0,
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length or T, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum() if num_items_in_batch is None else num_items_in_batch}
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


def both(ours, theirs, lp):
    """(loss, grad) of our function and of TRL's on separate leaf copies of lp."""
    out = []
    for fn in (ours, theirs):
        x = t(lp).requires_grad_(True)
        loss = fn(x)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


def rl_batch(seed, N=8, T=7, spread=0.6):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 0.7, (N, T))
    old = lp + rng.normal(0, spread, (N, T))
    lengths = rng.integers(1, T + 1, N)
    m = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    adv = np.abs(rng.normal(0, 1, N)) * np.resize([1.0, -1.0], N)
    return lp, old, adv, m


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_equals_trl(loss_type):
    lp, old, adv, m = rl_batch(0)
    (l1, g1), (l2, g2) = both(
        lambda x: grpo_loss(x, t(old), t(adv), t(m), epsilon_high=0.28, loss_type=loss_type, max_completion_length=9)[0],
        lambda x: trl_grpo_loss(x, t(old), t(adv), t(m), loss_type=loss_type, epsilon_high=0.28,
                                max_completion_length=9)[0], lp)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_gspo_equals_trl_sequence_level_importance_sampling():
    lp, old, adv, m = rl_batch(6, N=12, T=9, spread=2e-3)     # sequence ratios on both sides of 1 − 3e-4 / 1 + 4e-4
    _, metrics = gspo_loss(t(lp), t(old), t(adv), t(m))
    assert metrics["clip_ratio/low"] > 0 and metrics["clip_ratio/high"] > 0 and metrics["clip_ratio/region"] < 1
    (l1, g1), (l2, g2) = both(
        lambda x: gspo_loss(x, t(old), t(adv), t(m))[0],
        lambda x: trl_grpo_loss(x, t(old), t(adv), t(m), loss_type="grpo", level="sequence",
                                epsilon_low=3e-4, epsilon_high=4e-4)[0], lp)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)
    assert (g1 != 0).any() and (g1[t(m).bool()] == 0).any()           # free and clipped sequences both present


@pytest.mark.parametrize("per_token", [False, True])
def test_cispo_equals_trl(per_token):
    lp, old, adv, m = rl_batch(2, spread=1.2)                         # ratios well past the cap of 5
    if per_token:
        adv = np.random.default_rng(3).normal(0, 1, lp.shape)
    n_items = torch.tensor(3.0 * m.sum())                             # a generation batch bigger than this call
    (l1, g1), (l2, g2) = both(
        lambda x: cispo_loss(x, t(old), t(adv), t(m), epsilon_high=4.0, num_items_in_batch=n_items)[0],
        # TRL's cispo epsilon_high is the cap itself: 5.0 = 1 + our 4.0
        lambda x: trl_grpo_loss(x, t(old), t(adv), t(m), loss_type="cispo", epsilon_high=5.0,
                                num_items_in_batch=n_items)[0], lp)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    _, ours = cispo_loss(t(lp), t(old), t(adv), t(m), epsilon_high=4.0)
    _, trl_metrics = trl_grpo_loss(t(lp), t(old), t(adv), t(m), loss_type="cispo", epsilon_high=5.0)
    np.testing.assert_allclose(ours["cispo_clip_ratio"].item(), trl_metrics["cispo_clip_ratio"][0], rtol=1e-12)
    assert ours["clip_ratio/high"] > 0


def trl_rloo_advantages(rewards, old, ref, mask, G, beta, normalize):
    """Run the advantage lines of RLOOTrainer._generate_and_score_completions on our tensors."""
    import trl.trainer.rloo_trainer as rloo_module
    src = inspect.getsource(rloo_module.RLOOTrainer._generate_and_score_completions)
    start_marker = "# Include the KL penalty in the reward"
    end_marker = "advantages = torch.nan_to_num(advantages, nan=0.0)"
    if start_marker not in src or end_marker not in src:
        pytest.fail("TRL's RLOO advantage lines moved: update the markers in tests/test_trl_equality.py")
    start = src.index(start_marker)
    start = src.rindex("\n", 0, start) + 1
    block = textwrap.dedent(src[start:src.index(end_marker) + len(end_marker)])
    scope = dict(vars(rloo_module))
    scope.update(self=SimpleNamespace(beta=beta, normalize_advantages=normalize), rewards=rewards.clone(),
                 old_per_token_logps=old, ref_per_token_logps=ref, completion_mask=mask, num_generations=G,
                 gather=lambda x: x)
    exec(compile(block, "trl-rloo-advantages", "exec"), scope)
    return scope["advantages"]


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(G, beta, normalize):
    rng = np.random.default_rng(4)
    N, T = 8, 6
    r = rng.normal(size=N)
    r[:2] = 0.5                                                      # a tied pair
    old, ref = rng.normal(-2, 0.5, (N, T)), rng.normal(-2, 0.5, (N, T))
    m = (np.arange(T)[None] < rng.integers(1, T + 1, N)[:, None]).astype(np.float64)
    ours = rloo_advantages(kl_in_reward(t(r), t(old), t(ref), t(m), beta), G, normalize=normalize)
    theirs = trl_rloo_advantages(t(r), t(old), t(ref), t(m), G, beta, normalize)
    # TRL's nanstd forms its Bessel factor count / (count − 1) from integer counts, in float32 even for
    # float64 input: a relative 2e-8 in the normalised advantages, nothing more
    tol = 1e-7 if normalize else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def gkd_inputs(seed, B=3, T=6, Hs=5, Ht=7, V=17, dtype=T64):
    rng = np.random.default_rng(seed)
    def mk(*shape, s=1.0):
        return torch.tensor(rng.normal(0, s, shape), dtype=dtype)
    m = torch.tensor((np.arange(T)[None] < rng.integers(1, T + 1, B)[:, None]).astype(np.float64), dtype=dtype)
    return mk(B, T, Hs), mk(V, Hs, s=0.7), mk(B, T, Ht), mk(V, Ht, s=0.7), m


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_gkd_equals_trl_generalized_jsd_loss(beta, temperature):
    from trl.experimental.gkd import GKDTrainer
    hs, ws, ht, wt, m = gkd_inputs(5)
    grads = []
    for which in ("ours", "trl"):
        a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if which == "ours":
            loss, _ = gkd_loss(a, b, ht, wt, m, beta=beta, temperature=temperature, chunk_tokens=4)
        else:
            labels = torch.where(m.bool(), 1, -100)
            loss = GKDTrainer.generalized_jsd_loss(a @ b.t(), ht @ wt.t(), labels=labels, beta=beta,
                                                   temperature=temperature)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_equals_trl_chunked_divergence(beta):
    """DistillationTrainer's hidden-state path (TRL's tiled kernel, torch fallback on CPU, fp32 inside)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    hs, ws, ht, wt, m = gkd_inputs(6, dtype=torch.float32)
    grads = []
    for which in ("ours", "trl"):
        a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if which == "ours":
            loss, _ = gkd_loss(a, b, ht, wt, m, beta=beta, temperature=0.9, chunk_tokens=4)
        else:
            loss, _, _ = _chunked_divergence_loss(a, ht, b, wt, m, beta, temperature=0.9)
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_opd_gradient_equals_trl_iw_opd_at_gamma_zero():
    from trl.experimental.iw_opd import IWOPDTrainer
    rng = np.random.default_rng(7)
    B, T, V = 3, 5, 11
    logits = t(rng.normal(0, 1.5, (B, T, V)))
    tokens = torch.tensor(rng.integers(0, V, (B, T)))
    m = (np.arange(T)[None] < rng.integers(1, T + 1, B)[:, None])
    labels = torch.where(torch.tensor(m), tokens, -100)
    teacher = t(rng.normal(-2.5, 0.8, (B, T)))
    stub = SimpleNamespace(temperature=1.0, iw_opd_gamma=0.0, iw_opd_epsilon=1e-8,
                           model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)})
    grads = []
    for which in ("ours", "trl"):
        z = logits.clone().requires_grad_(True)
        if which == "ours":
            lp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]
            loss, _ = opd_loss(lp, None, teacher, t(m.astype(np.float64)))
        else:
            rollout = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
            loss = IWOPDTrainer._compute_iw_opd_loss(stub, z, tokens, labels, teacher, rollout_logprobs=rollout)
        loss.backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    assert grads[0].abs().sum() > 0
