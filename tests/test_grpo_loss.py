"""RL losses (GRPO family, DAPO tricks, RLVR, Nash-MD, Bradley–Terry reward model) against numpy
references written independently from the torch code, and the properties that define them."""
import os

import numpy as np
import pytest
import torch

from losses.grpo import dynamic_sampling_keep, group_advantages, grpo_loss, overlong_penalty
from losses.nash_md import mixture_logits, nash_md_loss, preference_probability
from losses.reward import RewardHead, last_token_index, reward_loss, sequence_rewards
from losses.rlvr import rlvr_loss, rlvr_rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T64 = torch.float64


# ---------------------------------------------------------------- numpy references

def np_advantages(r, G, scale, eps=1e-4):
    g = np.asarray(r, dtype=np.float64).reshape(-1, G)
    adv = (g - g.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return adv
    if scale == "group":
        std = np.repeat(g.std(axis=1, ddof=1), G)          # unbiased, as torch.std / TRL
    else:
        std = np.full(adv.shape, np.asarray(r, dtype=np.float64).std(ddof=1))
    return adv / (std + eps)


def np_grpo(lp, old, adv, m, ref, beta, el, eh, loss_type, L=None, n_items=None):
    ratio = np.exp(lp - old)
    A = adv[:, None]
    unclipped = ratio * A
    clipped = np.clip(ratio, 1 - el, 1 + eh) * A
    per = -np.minimum(unclipped, clipped)
    k3 = None
    if ref is not None:
        k3 = np.exp(ref - lp) - (ref - lp) - 1
        if beta > 0:
            per = per + beta * k3
    per = np.where(m > 0, per, 0.0)
    N, T = lp.shape
    if loss_type == "grpo":
        loss = np.mean(per.sum(1) / np.maximum(m.sum(1), 1))
    elif loss_type == "bnpo":
        loss = per.sum() / max(m.sum(), 1)
    elif loss_type == "dr_grpo":
        loss = per.sum() / (N * (L if L is not None else T))
    else:
        loss = per.sum() / (n_items if n_items is not None else max(m.sum(), 1))
    tok = m > 0
    low = (ratio < 1 - el) & (A < 0)
    high = (ratio > 1 + eh) & (A > 0)
    metrics = {"clip_ratio/low": low[tok].mean(), "clip_ratio/high": high[tok].mean(),
               "clip_ratio/region": (low | high)[tok].mean(), "ratio_mean": ratio[tok].mean()}
    if k3 is not None:
        metrics["kl"] = k3[tok].mean()
    return loss, metrics


def rl_batch(seed=0, N=8, T=7):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 0.7, (N, T))
    old = lp + rng.normal(0, 0.6, (N, T))          # ratios spread well past both clip edges
    ref = lp + rng.normal(0, 0.5, (N, T))
    adv = np.abs(rng.normal(0, 1, N)) * np.resize([1.0, -1.0], N)   # both signs
    lengths = rng.integers(1, T + 1, N)
    m = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    return lp, old, ref, adv, m


def t(x):
    return torch.tensor(x, dtype=T64)


# ---------------------------------------------------------------- advantages

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy(scale):
    rng = np.random.default_rng(1)
    r = rng.normal(size=24)
    r[4:8] = 0.5                                   # one tied group
    got = group_advantages(t(r), 4, scale).numpy()
    np.testing.assert_allclose(got, np_advantages(r, 4, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_zero_mean_per_group_and_tied_groups_get_zero(scale):
    r = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.4, 0.4])
    adv = group_advantages(r, 4, scale).view(-1, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(4, dtype=T64), atol=1e-12, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4, dtype=T64)) and torch.equal(adv[2], torch.zeros(4, dtype=T64))


def test_group_scaling_is_invariant_to_affine_rewards():
    rng = np.random.default_rng(2)
    r = t(rng.normal(size=32))
    for a, b in [(3.0, -7.0), (0.25, 2.0), (10.0, 0.0)]:
        # eps = 0: exactly invariant; TRL's eps = 1e-4 perturbs it by O(eps / std)
        torch.testing.assert_close(group_advantages(a * r + b, 8, "group", eps=0.0), group_advantages(r, 8, "group", eps=0.0))
        torch.testing.assert_close(group_advantages(a * r + b, 8, "group"), group_advantages(r, 8, "group"), rtol=2e-3, atol=2e-3)
    # without scaling only shifts are free, a scale is not
    torch.testing.assert_close(group_advantages(r + 5, 8, "none"), group_advantages(r, 8, "none"))
    assert not torch.allclose(group_advantages(3 * r, 8, "none"), group_advantages(r, 8, "none"))


def test_advantage_edge_cases():
    assert torch.equal(group_advantages(t([0.3, 0.9]), 1), torch.zeros(2, dtype=T64))   # G=1: no spread, no NaN
    assert group_advantages([1, 0, 0, 0], 4).dtype == torch.float32                    # ints are fine
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(t([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(t([1.0, 2.0]), 2, "std")


# ---------------------------------------------------------------- the clipped surrogate + k3 KL

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_grpo_loss_matches_numpy(loss_type, beta, eps):
    lp, old, ref, adv, m = rl_batch()
    loss, metrics = grpo_loss(t(lp), t(old), t(adv), t(m), ref_logps=t(ref), beta=beta,
                              epsilon_low=eps[0], epsilon_high=eps[1], loss_type=loss_type)
    ref_loss, ref_metrics = np_grpo(lp, old, adv, m, ref, beta, eps[0], eps[1], loss_type)
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-12, atol=1e-12)
    for k, v in ref_metrics.items():
        np.testing.assert_allclose(metrics[k].item(), v, rtol=1e-12, atol=1e-12, err_msg=k)
    assert metrics["clip_ratio/low"] > 0 and metrics["clip_ratio/high"] > 0   # both sides exercised


def test_normaliser_arguments():
    lp, old, ref, adv, m = rl_batch(3)
    loss, _ = grpo_loss(t(lp), t(old), t(adv), t(m), loss_type="dr_grpo", max_completion_length=32)
    np.testing.assert_allclose(loss.item(), np_grpo(lp, old, adv, m, None, 0, .2, .2, "dr_grpo", L=32)[0], rtol=1e-12)
    loss, _ = grpo_loss(t(lp), t(old), t(adv), t(m), loss_type="dapo", num_items_in_batch=100)
    np.testing.assert_allclose(loss.item(), np_grpo(lp, old, adv, m, None, 0, .2, .2, "dapo", n_items=100)[0], rtol=1e-12)
    # dapo over micro-batches with the generation batch's token count adds up to one token mean (= bnpo)
    n_items = int(m.sum())
    parts = [grpo_loss(t(lp[i:i + 2]), t(old[i:i + 2]), t(adv[i:i + 2]), t(m[i:i + 2]), loss_type="dapo",
                       num_items_in_batch=torch.tensor(n_items))[0] for i in range(0, 8, 2)]
    full, _ = grpo_loss(t(lp), t(old), t(adv), t(m), loss_type="bnpo")
    torch.testing.assert_close(sum(parts), full)


def test_both_clip_sides_stop_the_gradient_only_where_clipping_is_active():
    # tokens: (ratio, A) = (1.5, +1) high-clipped, (0.5, +1) free, (0.5, -1) low-clipped, (1.5, -1) free
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=T64)
    adv_tok = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=T64)
    lp = torch.log(ratio).reshape(4, 1).clone().requires_grad_(True)   # one token per sequence, old = 0
    loss, metrics = grpo_loss(lp, torch.zeros(4, 1, dtype=T64), adv_tok, torch.ones(4, 1, dtype=T64), loss_type="bnpo")
    loss.backward()
    g = lp.grad.view(-1)
    assert g[0] == 0 and g[2] == 0                               # clipped: no gradient
    # free tokens: d/dlogp of −r·A/4 is −r·A/4
    torch.testing.assert_close(g[[1, 3]], torch.tensor([-0.5 * 1 / 4, -1.5 * -1 / 4], dtype=T64))
    assert metrics["clip_ratio/high"].item() == 0.25 and metrics["clip_ratio/low"].item() == 0.25
    assert metrics["clip_ratio/region"].item() == 0.5


def test_first_on_policy_step_has_ratio_one_and_nothing_clipped():
    lp, _, _, adv, m = rl_batch(4)
    for old in (t(lp), None):
        loss, metrics = grpo_loss(t(lp), old, t(adv), t(m), loss_type="bnpo")
        assert metrics["ratio_mean"].item() == 1.0
        assert metrics["clip_ratio/region"].item() == 0.0
        # with ratio 1 the loss is −A averaged over tokens
        np.testing.assert_allclose(loss.item(), -(adv[:, None] * m).sum() / m.sum(), rtol=1e-12)
    lp_t = t(lp).requires_grad_(True)
    loss, _ = grpo_loss(lp_t, None, t(adv), t(m), loss_type="grpo")
    loss.backward()
    expected = -adv[:, None] * m / m.sum(1, keepdims=True) / len(adv)   # d(−r·A)/dlogp = −A at r = 1
    np.testing.assert_allclose(lp_t.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_beta_zero_ignores_ref_logps():
    lp, old, ref, adv, m = rl_batch(5)
    grads = []
    for r in (None, t(ref), t(ref + 50.0)):
        x = t(lp).requires_grad_(True)
        loss, _ = grpo_loss(x, t(old), t(adv), t(m), ref_logps=r, beta=0.0, loss_type="grpo")
        loss.backward()
        grads.append((loss.detach(), x.grad))
    for loss, g in grads[1:]:
        assert torch.equal(loss, grads[0][0]) and torch.equal(g, grads[0][1])


def test_k3_kl_properties():
    lp, old, ref, adv, m = rl_batch(6)
    _, metrics = grpo_loss(t(lp), t(old), t(adv), t(m), ref_logps=t(ref), beta=0.1)
    d = ref - lp
    np.testing.assert_allclose(metrics["kl"].item(), (np.exp(d) - d - 1)[m > 0].mean(), rtol=1e-12)
    assert metrics["kl"] > 0
    _, metrics = grpo_loss(t(lp), t(old), t(adv), t(m), ref_logps=t(lp), beta=0.1)
    assert metrics["kl"].item() == 0.0
    # beta scales exactly the KL term
    l0, _ = grpo_loss(t(lp), t(old), t(adv), t(m), ref_logps=t(ref), beta=0.0, loss_type="bnpo")
    l1, _ = grpo_loss(t(lp), t(old), t(adv), t(m), ref_logps=t(ref), beta=0.5, loss_type="bnpo")
    np.testing.assert_allclose((l1 - l0).item(), 0.5 * (np.exp(d) - d - 1)[m > 0].mean(), rtol=1e-10)


def test_padding_never_leaks_into_the_loss():
    lp, old, ref, adv, m = rl_batch(7)
    base, _ = grpo_loss(t(lp), t(old), t(adv), t(m), ref_logps=t(ref), beta=0.1)
    junk = np.where(m > 0, 0.0, 1e4)                                  # exp(1e4) would be inf
    loss, metrics = grpo_loss(t(lp - junk), t(old + junk), t(adv), t(m), ref_logps=t(ref + junk), beta=0.1)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    torch.testing.assert_close(loss, base)


def test_grpo_loss_errors():
    lp, old, ref, adv, m = rl_batch()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(t(lp), t(old), t(adv), t(m), loss_type="ppo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(t(lp), t(old), t(adv[:3]), t(m))


def test_rlvr_reuses_grpo_loss():
    from losses.grpo import grpo_loss as g
    assert rlvr_loss is g
    assert rlvr_rewards([[1.0, 0.0], [], [1.0, 1.0]], [1.0, 1.0, 0.0]) == [0.75, 0.5, 0.5]
    assert rlvr_rewards([[1.0]], [0.0], process_weight=0.0) == [0.0]
    with pytest.raises(ValueError):
        rlvr_rewards([[1.0]], [1.0, 0.0])


# ---------------------------------------------------------------- DAPO data tricks

def test_overlong_penalty_shape():
    lengths = [0, 8, 12, 13, 14, 16, 17, 100]
    got = overlong_penalty(lengths, max_len=16, cache_len=4).tolist()
    ref = [0.0 if L <= 12 else ((12 - L) / 4 if L <= 16 else -1.0) for L in lengths]
    np.testing.assert_allclose(got, ref)
    assert got[:3] == [0, 0, 0] and got[5] == -1.0 and got[-1] == -1.0
    assert all(a >= b for a, b in zip(got, got[1:]))                 # never rewards length
    assert overlong_penalty([16, 17], 16, 0).tolist() == [0.0, -1.0]   # no cache: a hard cut
    with pytest.raises(ValueError):
        overlong_penalty([1], 4, 8)


def test_dynamic_sampling_keeps_only_untied_groups():
    r = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0.5, 0.5, 0.5, 0.5 + 1e-9, 0.2, 0.3, 0.2, 0.2]
    assert dynamic_sampling_keep(r, 4).tolist() == [False, False, True, False, True]
    keep = dynamic_sampling_keep(r, 4)
    kept = torch.tensor(r, dtype=T64).view(-1, 4)[keep].view(-1)
    assert (group_advantages(kept, 4).view(-1, 4).abs().sum(1) > 0).all()


# ---------------------------------------------------------------- Nash-MD

def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_nash_md_mixture():
    rng = np.random.default_rng(8)
    zp, zr = rng.normal(0, 2, (3, 5, 11)), rng.normal(0, 2, (3, 5, 11))
    lp, lr = np_log_softmax(zp), np_log_softmax(zr)
    torch.testing.assert_close(mixture_logits(t(zp), t(zr), 0.0), t(lp))         # coef 0: the policy
    torch.testing.assert_close(mixture_logits(t(zp), t(zr), 1.0), t(lr))         # coef 1: the reference
    for c in (0.25, 0.5, 0.9):
        got = mixture_logits(t(zp), t(zr), c)
        torch.testing.assert_close(got.exp().sum(-1), torch.ones(3, 5, dtype=T64))   # normalised
        geo = np.exp((1 - c) * lp + c * lr)
        torch.testing.assert_close(got, t(np.log(geo / geo.sum(-1, keepdims=True))))
        torch.testing.assert_close(got, t(np_log_softmax(c * zr + (1 - c) * zp)))   # TRL mixes raw logits
    with pytest.raises(ValueError):
        mixture_logits(t(zp), t(zr), 1.5)


def test_nash_md_loss_matches_numpy_value_and_gradient():
    rng = np.random.default_rng(9)
    N, T, beta = 5, 6, 0.1
    lp, ref = rng.normal(-2, 0.5, (N, T)), rng.normal(-2, 0.5, (N, T))
    m = (np.arange(T)[None] < rng.integers(1, T + 1, N)[:, None]).astype(np.float64)
    p = rng.uniform(0, 1, N)
    x = t(lp).requires_grad_(True)
    loss, metrics = nash_md_loss(x, t(ref), t(m), t(p), beta=beta)
    S = (lp * m).sum(1)
    ratio = (lp - ref) * m
    ref_loss = np.mean(beta * (ratio * lp).sum(1) - (p - 0.5) * S)
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-12)
    loss.backward()
    # REINFORCE: −(P − ½)·∇log π + β·(log π − log π_ref)·∇log π, per completion token, mean over N
    np.testing.assert_allclose(x.grad.numpy(), (beta * (lp - ref) - (p - 0.5)[:, None]) * m / N, rtol=1e-12)
    np.testing.assert_allclose(metrics["loss/kl"].item(), ratio.sum(1).mean(), rtol=1e-12)
    np.testing.assert_allclose(metrics["rewards/probabilities"].item(), p.mean(), rtol=1e-12)
    # a tie (P = ½) leaves only the KL pull; P > ½ raises the sample's log-prob
    x = t(lp).requires_grad_(True)
    nash_md_loss(x, t(lp), t(m), t(np.full(N, 0.9)), beta=beta)[0].backward()
    assert (x.grad[m > 0] < 0).all()
    with pytest.raises(ValueError, match="probabilities"):
        nash_md_loss(t(lp), t(ref), t(m), t(p + 1.0))
    torch.testing.assert_close(preference_probability(t([2.0, 0.0]), t([0.0, 0.0])), t([1 / (1 + np.exp(-2)), 0.5]))


# ---------------------------------------------------------------- Bradley–Terry reward model

def np_bt(rc, rr, margin=None, center=None):
    z = rc - rr - (0 if margin is None else margin)
    loss = np.mean(np.logaddexp(0.0, -z))
    if center is not None:
        loss += center * np.mean((rc + rr) ** 2)
    return loss


@pytest.mark.parametrize("margin", [None, 0.5])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_matches_numpy(margin, center):
    rng = np.random.default_rng(10)
    rc, rr = rng.normal(0.3, 1, 16), rng.normal(0, 1, 16)
    mg = None if margin is None else np.full(16, margin)
    loss, metrics = reward_loss(t(rc), t(rr), None if mg is None else t(mg), center)
    np.testing.assert_allclose(loss.item(), np_bt(rc, rr, mg, center), rtol=1e-12)
    assert metrics["accuracy"].item() == np.mean(rc > rr)
    np.testing.assert_allclose(metrics["margin"].item(), np.mean(rc - rr), rtol=1e-12)


def test_reward_accuracy_and_large_margins_stay_finite():
    loss, metrics = reward_loss(t([5.0, -1.0, 2.0, 1000.0]), t([1.0, 0.0, 2.0, -1000.0]))
    assert metrics["accuracy"].item() == 0.5                 # ties are not correct
    assert torch.isfinite(loss)
    loss, _ = reward_loss(t([-1000.0]), t([1000.0]))
    np.testing.assert_allclose(loss.item(), 2000.0)


def test_reward_head_and_last_token():
    head = RewardHead(8)
    assert list(head.state_dict()) == ["score.weight"] and head.score.bias is None
    am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(am).tolist() == [2, 4, 4]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[0, 0]]))


def test_sequence_rewards_on_the_tiny_model_ignore_padding():
    from model.load import load_model
    model, _ = load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu", with_tokenizer=False)
    torch.manual_seed(0)
    head = RewardHead(model.config.hidden_size)
    ids = torch.tensor([[5, 9, 13, 21, 34]])
    alone = sequence_rewards(model, head, ids, torch.ones_like(ids))
    with torch.no_grad():
        expected = head(model(ids, hidden_only=True)[0, -1])
    torch.testing.assert_close(alone[0], expected)
    right = torch.tensor([[5, 9, 13, 21, 34, 0, 0], [7, 8, 0, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 5, 9, 13, 21, 34], [0, 0, 0, 0, 0, 7, 8]])
    r_right = sequence_rewards(model, head, right, (right != 0).long())
    r_left = sequence_rewards(model, head, left, (left != 0).long())
    torch.testing.assert_close(r_right[0], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_left, r_right, rtol=1e-4, atol=1e-5)
