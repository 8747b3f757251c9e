"""On-policy preference pairs (rollout/pairs.py) and method=dpo_on_policy end to end."""
import json
import os

import pytest
import torch

from data.formats import read_jsonl
from model.load import load_model
from rollout.pairs import sample_pairs
from rollout.rewards import get_rewards
from rollout.sampler import SamplingConfig
from tasks.arithmetic import is_correct
from tests.test_train import REPO, run_train

TINY = os.path.join(REPO, "assets", "tiny-qwen3")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def prompts():
    return read_jsonl(os.path.join(REPO, "data", "synthetic", "grpo_train.jsonl"), "prompt")[:24]


def test_pairs_come_from_mixed_groups_with_a_right_chosen_and_a_wrong_rejected(tiny, prompts):
    model, tok = tiny
    math = get_rewards(["math_answer"])[0]
    pairs, stats = sample_pairs(model, tok, prompts, math, samples=6, seed=3, pairs_per_prompt=2,
                                sampling=SamplingConfig(max_new_tokens=16, temperature=1.0))
    assert pairs, stats  # the base model is right on about half the sums at T=1: some groups are mixed
    by_prompt = {}
    for p in pairs:
        assert is_correct(p["chosen"], p["answer"]) and not is_correct(p["rejected"], p["answer"])
        assert p["task"] == "on_policy" and p["chosen"] != p["rejected"]
        by_prompt.setdefault(p["prompt"], []).append(p)
    assert all(len(v) <= 2 and len({p["rejected"] for p in v}) == len(v) for v in by_prompt.values())
    assert stats["prompts"] == len(prompts) and stats["pairs"] == len(pairs)
    # a prompt gives pairs exactly when its samples were neither all right nor all wrong
    mixed = len(prompts) * (1 - stats["all_right"] - stats["all_wrong"])
    assert len(by_prompt) == round(mixed)
    # the same seed draws the same samples
    again, _ = sample_pairs(model, tok, prompts, math, samples=6, seed=3, pairs_per_prompt=2,
                            sampling=SamplingConfig(max_new_tokens=16, temperature=1.0))
    assert again == pairs


def test_threshold_decides_what_counts_as_right(tiny, prompts):
    """A reward that scores every completion 0.5: with threshold 1 nothing is right (every group all
    wrong, no pairs); with threshold 0.5 everything is (all right, no pairs)."""
    model, tok = tiny
    half = lambda prompts, completions, **f: [0.5] * len(completions)  # noqa: E731
    cfg = SamplingConfig(max_new_tokens=4)
    pairs, stats = sample_pairs(model, tok, prompts[:4], half, samples=2, sampling=cfg)
    assert pairs == [] and stats["all_wrong"] == 1.0
    pairs, stats = sample_pairs(model, tok, prompts[:4], half, samples=2, sampling=cfg, threshold=0.5)
    assert pairs == [] and stats["all_right"] == 1.0 and stats["sample_accuracy"] == 1.0


def test_bad_arguments_are_clear_errors(tiny, prompts):
    model, tok = tiny
    math = get_rewards(["math_answer"])[0]
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_pairs(model, tok, prompts, math, samples=1)
    with pytest.raises(ValueError, match="no prompts"):
        sample_pairs(model, tok, [], math)


def test_dpo_on_policy_run_trains_on_its_own_samples_plus_the_kept_rows(tmp_path):
    small = tmp_path / "prompts.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(
        os.path.join(REPO, "data", "synthetic", "grpo_train.jsonl"), "prompt")[:16]))
    run_dir, out = run_train(tmp_path, "method=dpo_on_policy", f"method.on_policy.prompts={small}",
                             "method.on_policy.keep_tasks=[style]", "method.max_steps=2", "method.batch_size=4",
                             "data.eval.arithmetic=null", "data.eval.style=null", "data.eval.harmful=null")
    rows = [json.loads(line) for line in (run_dir / "on_policy_pairs.jsonl").read_text().splitlines()]
    sampled = [r for r in rows if r["task"] == "on_policy"]
    kept = [r for r in rows if r["task"] != "on_policy"]
    shipped = read_jsonl(os.path.join(REPO, "data", "synthetic", "preference_train.jsonl"), "preference")
    assert sampled and all(r["prompt"] in {json.loads(x)["prompt"] for x in small.read_text().splitlines()}
                           for r in sampled)
    assert len(kept) == sum(r["task"] == "style" for r in shipped) and {r["task"] for r in kept} == {"style"}
    assert f"on-policy pairs: {len(sampled)} from 16 prompts" in out.stdout
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1] and all("nll_loss" in r for r in lines)
    assert "preference_accuracy" in json.loads((run_dir / "eval.json").read_text())["after"]
