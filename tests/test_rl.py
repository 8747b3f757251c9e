"""rollout/rl.py: rollout batches for the GRPO family, on the embedded model."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from data.formats import read_jsonl
from model.load import load_model
from rollout.rl import RolloutSource, completion_logprobs, rollout_loss_inputs
from rollout.rewards import register

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    return load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(os.path.join(REPO, "data", "synthetic", "grpo_train.jsonl"), "prompt")[:12]


def method(**kw):
    base = dict(reward=["math_answer"], num_generations=4, prompts_per_step=3, max_new_tokens=12, temperature=1.0,
                num_iterations=1, micro_batch_size=5, scale_rewards="group")
    return OmegaConf.create({**base, **kw})


def test_collected_old_logprobs_equal_a_training_forward_so_the_first_ratio_is_one(tiny, rows):
    model, tok = tiny
    src = RolloutSource(rows, tok, method(), seed=0)
    micro, metrics = src.step(model)
    assert sum(len(mb) for mb in micro) == 12 and [len(mb) for mb in micro] == [5, 5, 2]
    for mb in micro:
        inputs, ntok, extra = rollout_loss_inputs(model, None, mb, tok, "cpu", 1.0, 1.0)
        m = inputs["mask"]
        torch.testing.assert_close(inputs["logps"] * m, inputs["old_logps"] * m, atol=1e-4, rtol=1e-4)
        assert extra["entropy"] > 0
    adv = torch.stack([r["advantage"] for mb in micro for r in mb]).view(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length/mean", "truncated_ratio",
                "rewards/math_answer/mean", "rollout_s"):
        assert key in metrics


def test_batch_is_reused_for_num_iterations_steps(tiny, rows):
    model, tok = tiny
    src = RolloutSource(rows, tok, method(num_iterations=2), seed=0)
    a, _ = src.step(model)
    b, _ = src.step(model)
    c, _ = src.step(model)
    assert a is not None and a[0][0] is b[0][0] and c[0][0] is not a[0][0]


def test_dynamic_sampling_drops_tied_groups_and_counts_them(tiny, rows):
    model, tok = tiny

    @register("always_one_test")
    def always_one(prompts, completions, **fields):
        return [1.0] * len(completions)

    src = RolloutSource(rows, tok, method(reward=["always_one_test"], dynamic_sampling=True, max_resample=1), seed=0)
    micro, metrics = src.step(model)
    assert micro == [] and metrics["dynamic_sampling/dropped"] == 6  # 3 prompts x 2 rounds, all tied


def test_completion_logprobs_align_with_completion_tokens(tiny):
    model, tok = tiny
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7]]
    lp = completion_logprobs(model, [3, 2], seqs, 2, tok.pad_token_id)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([seqs[0]])), -1)[0]
    torch.testing.assert_close(lp[0], torch.stack([full[2, 8], full[3, 9]]), atol=1e-5, rtol=1e-5)
