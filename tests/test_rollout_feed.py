"""trainer/feeds/rollouts.py: rollout batches for the GRPO family, on the embedded model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_feed
from losses.grpo import grpo_loss
from rollout.rewards import register
from trainer.feeds.rollouts import micro_batch_weights
from trainer.forward import completion_logprobs, shared_prompt_logprobs
from trainer.paths import REPO


def feed(tok, model=None, **kw):
    """A GRPO feed over the first 12 training prompts: 3 prompts x 4 samples, micro-batches of 5."""
    opts = {**dict(reward="[math_answer]", reward_weights="null", num_generations=4, prompts_per_step=3,
                   max_new_tokens=12, micro_batch_size=5), **kw}
    return make_feed(["method=grpo", *[f"method.{k}={v}" for k, v in opts.items()]], tok, model, n_rows=12)


def test_collected_old_logprobs_equal_a_training_forward_so_the_first_ratio_is_one(tiny):
    model, tok = tiny
    f = feed(tok)
    step = f.next_step(model)
    micro, metrics = step.micro_batches, step.metrics
    assert sum(len(mb) for mb in micro) == 12 and [len(mb) for mb in micro] == [5, 5, 2]
    for mb in micro:
        inputs, ntok, extra = f.loss_inputs(model, None, mb)
        m = inputs["mask"]
        torch.testing.assert_close(inputs["logps"] * m, inputs["old_logps"] * m, atol=1e-4, rtol=1e-4)
        assert extra["entropy"] > 0
    assert step.weights == [5 / 12, 5 / 12, 2 / 12]
    adv = torch.stack([e.advantage for mb in micro for e in mb]).view(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length/mean", "truncated_ratio",
                "rewards/math_answer/mean", "rollout_s"):
        assert key in metrics


def test_batch_is_reused_for_num_iterations_steps(tiny):
    model, tok = tiny
    src = feed(tok, num_iterations=2)
    a, b, c = (src.next_step(model).micro_batches for _ in range(3))
    assert a[0][0] is b[0][0] and c[0][0] is not a[0][0]


def test_dynamic_sampling_drops_tied_groups_and_counts_them(tiny):
    model, tok = tiny

    @register("always_one_test")
    def always_one(prompts, completions, **fields):
        return [1.0] * len(completions)

    step = feed(tok, reward="[always_one_test]", dynamic_sampling=True, max_resample=1).next_step(model)
    micro, metrics = step.micro_batches, step.metrics
    assert micro == [] and metrics["dynamic_sampling/dropped"] == 6  # 3 prompts x 2 rounds, all tied


def test_dynamic_sampling_reward_metrics_cover_every_round(tiny):
    """The first round's groups all tie (reward 1) and are dropped; the resampled round scores 0 for the
    first completion of each group and 1 otherwise. rewards/NAME/mean is over both rounds' 24
    completions (the old code reported the last round only: 0.75), `reward` over the kept ones."""
    model, tok = tiny
    calls = []

    @register("tied_then_spread_test")
    def tied_then_spread(prompts, completions, **fields):
        calls.append(len(completions))
        return [1.0] * len(completions) if len(calls) == 1 else [0.0 if i % 4 == 0 else 1.0 for i in range(len(completions))]

    step = feed(tok, reward="[tied_then_spread_test]", dynamic_sampling=True, max_resample=1).next_step(model)
    micro, metrics = step.micro_batches, step.metrics
    assert calls == [12, 12] and metrics["dynamic_sampling/dropped"] == 3
    assert metrics["rewards/tied_then_spread_test/mean"] == (12 + 9) / 24
    assert metrics["reward"] == 0.75 and sum(len(mb) for mb in micro) == 12


def test_completion_logprobs_align_with_completion_tokens(tiny):
    model, tok = tiny
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7]]
    lp = completion_logprobs(model, [3, 2], seqs, 2, tok.pad_token_id)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([seqs[0]])), -1)[0]
    torch.testing.assert_close(lp[0], torch.stack([full[2, 8], full[3, 9]]), atol=1e-5, rtol=1e-5)


def accumulated_grads(model, f, micro_batches, scales, loss_type):
    model.zero_grad(set_to_none=True)
    for mb, scale in zip(micro_batches, scales):
        inputs, _, _ = f.loss_inputs(model, None, mb)
        loss, _ = grpo_loss(**inputs, loss_type=loss_type)
        (loss * scale).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_unequal_micro_batches_accumulate_the_whole_batch_gradient(tiny, loss_type):
    # 12 rows in micro-batches of 5, 5, 2: weighting each by 1/3 counted the last two rows 2.5x
    model, tok = tiny
    f = feed(tok, **{"loss_args.loss_type": loss_type})
    step = f.next_step(model)
    micro = step.micro_batches
    g = torch.Generator().manual_seed(0)
    for mb in micro:  # spread advantages, so no row's gradient vanishes
        for e in mb:
            e.advantage = torch.randn((), generator=g)
    assert [len(mb) for mb in micro] == [5, 5, 2]
    whole = accumulated_grads(model, f, [[e for mb in micro for e in mb]], [1.0], loss_type)
    split = accumulated_grads(model, f, micro, step.weights, loss_type)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert step.weights == micro_batch_weights(micro, {"dapo": "batch", "bnpo": "tokens"}.get(loss_type, "sequences"))
    if loss_type == "dapo":  # normalised by the whole batch already: 1 per micro-batch
        assert step.weights == [1.0, 1.0, 1.0]
        return
    flat = accumulated_grads(model, f, micro, [1 / 3] * 3, loss_type)
    assert max((a - b).abs().max().item() for a, b in zip(flat, whole)) > 1e-3  # the old 1/k weighting differs


def test_train_py_gradient_does_not_depend_on_micro_batch_size(tmp_path):
    # 5 prompts x 4 samples = 20 rollout rows: one micro-batch of 20, or 8 + 8 + 4; same rollouts (same seed)
    norms = []
    for mb in (20, 8):
        run = tmp_path / f"mb{mb}"
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "method=grpo", f"hydra.run.dir={run}", "progress=false",
               "eval_before=false", "eval_after=false", "method.max_steps=1", "method.prompts_per_step=5",
               "method.num_generations=4", f"method.micro_batch_size={mb}"]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        norms.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["grad_norm"])
    assert norms[0] > 0.1  # some group has a reward spread (else the comparison says nothing)
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)


def test_shared_prompt_forward_equals_one_forward_per_sample(tiny):
    """Groups of consecutive rows with one prompt (and a prompt that comes back later, as its own
    group): one prefill per group gives each sample's completion log-probs, entropy and gradient."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    pa, pb = torch.randint(5, 600, (12,), generator=g).tolist(), torch.randint(5, 600, (7,), generator=g).tolist()
    seqs, plens = [], []
    for p, n in ((pa, 3), (pb, 2), (pa, 1)):
        for j in range(n):
            seqs.append(p + torch.randint(5, 600, (1 + (j * 3) % 5,), generator=g).tolist())
            plens.append(len(p))
    width = max(len(s) - n for s, n in zip(seqs, plens))
    mask = torch.zeros(len(seqs), width)
    for i, (s, n) in enumerate(zip(seqs, plens)):
        mask[i, :len(s) - n] = 1
    grads = []
    for fn in (completion_logprobs, shared_prompt_logprobs):
        model.zero_grad()
        logp, ent = fn(model, plens, seqs, width, 0, 0.9, with_entropy=True)
        (logp * mask).sum().backward()
        grads.append(([p.grad.clone() for p in model.parameters()], logp.detach() * mask, ent * mask))
    model.zero_grad()
    (ga, la, ea), (gb, lb, eb) = grads
    torch.testing.assert_close(lb, la, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(eb, ea, atol=2e-5, rtol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)


def test_dr_grpo_divides_by_the_configured_max_length_not_the_batch_width(tiny):
    """Dr. GRPO's normaliser is a constant (N x max_new_tokens); the batch's longest completion
    changes from step to step and would rescale the gradient with it."""
    model, tok = tiny
    f = feed(tok, max_new_tokens=40)
    mb = [e for m in f.next_step(model).micro_batches for e in m]
    g = torch.Generator().manual_seed(1)
    for e in mb:
        e.advantage = torch.randn((), generator=g)
    capped, _, _ = f.loss_inputs(model, None, mb)
    assert capped["max_completion_length"] == 40
    loss, _ = grpo_loss(**capped, loss_type="dr_grpo")
    with torch.no_grad():  # on-policy (ratio 1): the per-token loss is -advantage
        want = -(capped["advantages"][:, None] * capped["mask"]).sum() / (len(mb) * 40)
    torch.testing.assert_close(loss.detach(), want, atol=1e-6, rtol=1e-5)
    plain = {k: v for k, v in capped.items() if k != "max_completion_length"}
    assert capped["mask"].shape[1] < 40 and abs(grpo_loss(**plain, loss_type="dr_grpo")[0].item() - loss.item()) > 1e-4


def test_a_prompt_without_the_column_its_reward_reads_is_an_error_naming_its_line(tiny, tmp_path):
    """math_answer reads `answer`: a row without one used to score 0 in silence (or crash at step 0)."""
    model, tok = tiny
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: field 'answer'"):
        make_feed(["method=grpo", f"data.train={path}"], tok)


def test_offline_groups_of_the_wrong_size_are_refused_before_training(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "groups.jsonl"
    group = lambda n: '{"prompt": "What is 1 + 1?", "responses": [%s]}' % ", ".join(['{"text": "2", "score": 1}'] * n)
    path.write_text(group(4) + "\n" + group(3) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2"):
        make_feed(["method=grpo_offline", f"data.train={path}"], tok)
    path.write_text(group(3) + "\n" + group(3) + "\n")  # equal sizes, but not num_generations=4
    with pytest.raises(ValueError, match=rf"{path}:1"):
        make_feed(["method=grpo_offline", f"data.train={path}"], tok)


def test_long_prompts_are_cut_to_max_length_and_reported(tiny, tmp_path, capsys):
    model, tok = tiny
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n'
                    f'{{"prompt": "{"very " * 2000}long: what is 2 + 2?", "answer": "4"}}\n')
    f = make_feed(["method=grpo", f"data.train={path}", "data.max_length=48"], tok)
    assert "1 of 2 prompts are longer than 48 tokens" in capsys.readouterr().err
    assert max(len(p) for p in f.prompt_ids) <= 48
    assert "long: what is 2 + 2?" in tok.decode(f.prompt_ids[1])  # the start was cut, the question kept
