"""rollout/nash_md.py: Nash-MD batches (policy vs mixture samples) on the embedded model."""
import copy
import os

import pytest
import torch
from omegaconf import OmegaConf

from data.formats import read_jsonl
from losses.nash_md import nash_md_loss
from model.load import load_model
from rollout.nash_md import NashMDSource, compare_preference, nash_md_loss_inputs
from rollout.rewards import register
from rollout.rl import completion_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return model, ref, tok


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(os.path.join(REPO, "data", "synthetic", "grpo_train.jsonl"), "prompt")[:12]


def method(**kw):
    base = dict(reward=["math_answer"], num_generations=2, prompts_per_step=3, max_new_tokens=12, temperature=1.0,
                micro_batch_size=4, mixture_coef=0.5)
    return OmegaConf.create({**base, **kw})


def test_compare_preference():
    p = compare_preference(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert p.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_step_gives_policy_samples_with_preferences_and_loss_inputs(tiny, rows):
    model, ref, tok = tiny
    src = NashMDSource(rows, tok, method(), seed=0, ref=ref)
    micro, metrics = src.step(model)
    assert [len(mb) for mb in micro] == [4, 2]
    for key in ("reward", "reward_mixture", "win_rate", "tie_rate", "rewards/math_answer/mean",
                "rewards/math_answer/mixture", "completion_length/mean", "rollout_s"):
        assert key in metrics
    prefs = torch.stack([r["preference"] for mb in micro for r in mb])
    assert set(prefs.tolist()) <= {0.0, 0.5, 1.0}
    # the preference is the comparison of the policy sample's reward with the mixture sample's
    assert prefs.mean().item() == pytest.approx(0.5 + 0.5 * (metrics["win_rate"] - (1 - metrics["win_rate"] - metrics["tie_rate"])))
    for mb in micro:
        inputs, ntok, extra = nash_md_loss_inputs(model, ref, mb, tok, "cpu", 1.0)
        assert inputs["policy_logps"].requires_grad and not inputs["ref_logps"].requires_grad
        m = inputs["mask"]
        # the policy is its own reference at the start: log-ratios are zero on the completion
        torch.testing.assert_close(inputs["policy_logps"] * m, inputs["ref_logps"] * m, atol=1e-5, rtol=0)
        # the log-probs are those of the sampled completion tokens y (what the loss trains on)
        seq_lp = completion_logprobs(model, [r["prompt_len"] for r in mb], [r["seq"] for r in mb], m.shape[1],
                                     tok.pad_token_id)
        torch.testing.assert_close((inputs["policy_logps"] * m).detach(), seq_lp.detach() * m)
        assert ntok == sum(len(r["seq"]) for r in mb) and extra["entropy"] > 0
        loss, lm = nash_md_loss(**inputs, beta=0.1)
        loss.backward()
        assert torch.isfinite(loss) and "rewards/probabilities" in lm
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_reward_model_style_rewards_give_sigmoid_preferences(tiny, rows):
    model, ref, tok = tiny

    @register("nash_md_test_length")
    def length(prompts, completions, **fields):
        return [len(c) / 10 for c in completions]

    src = NashMDSource(rows, tok, method(reward=["nash_md_test_length"], preference="sigmoid"), seed=0, ref=ref)
    micro, _ = src.step(model)
    prefs = torch.stack([r["preference"] for mb in micro for r in mb])
    assert ((prefs > 0) & (prefs < 1)).all()


def test_needs_a_reference_and_a_valid_coefficient(tiny, rows):
    model, ref, tok = tiny
    with pytest.raises(ValueError, match="reference"):
        NashMDSource(rows, tok, method(), seed=0, ref=None)
    with pytest.raises(ValueError, match="mixture_coef"):
        NashMDSource(rows, tok, method(mixture_coef=1.5), seed=0, ref=ref)


def test_ranks_split_the_step_prompts_and_sample_with_their_own_seeds(tiny, rows):
    """Under torchrun each rank takes its share of the step's prompts (as GRPO's source does), so N
    processes do the work of one with N times the prompts, not N copies of the same batch."""
    model, ref, tok = tiny
    one = NashMDSource(rows, tok, method(prompts_per_step=4), seed=0, ref=ref)
    ranks = [NashMDSource(rows, tok, method(prompts_per_step=2), seed=0, ref=ref, rank=r, world=2) for r in (0, 1)]
    whole = [r["prompt"] for r in one._prompts(4)]
    shares = [[r["prompt"] for r in src._prompts(2)] for src in ranks]
    assert sorted(shares[0] + shares[1]) == sorted(whole) and not set(shares[0]) & set(shares[1])
    a, b = (src.collect(model)["rows"] for src in ranks)
    assert len(a) == len(b) == 2 * 2  # 2 prompts x 2 samples on each rank
    assert [r["seq"][:r["prompt_len"]] for r in a[::2]] != [r["seq"][:r["prompt_len"]] for r in b[::2]]
