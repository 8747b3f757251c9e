"""A reward model (method=reward's checkpoint) used as the reward of GRPO and Nash-MD."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_feed
from data.formats import tokenize_pair
from losses.reward import sequence_rewards
from model.load import add_score_head, load_model, save_model
from rollout.rewards import reward_model_reward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "assets", "tiny-qwen3")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A *ForSequenceClassification checkpoint of the embedded model with a random score head."""
    model, tok = load_model(TINY, dtype="fp32", device="cpu")
    add_score_head(model)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=model.config.hidden_size ** -0.5)
    return save_model(model, str(tmp_path_factory.mktemp("rm") / "final"), tok)


def test_reward_model_reward_scores_each_chat_alone(rm_dir):
    fn = reward_model_reward(rm_dir, batch_size=2)
    prompts = ["What is 3 + 4?", "Compute 12 - 5.", "Find 1 + 1."]
    completions = ["Answer: 7", "Happy to help! Answer: 7", "Answer: 3"]
    got = fn(prompts, completions, answer=["7", "7", "2"])
    assert fn.reward_name == "reward_model" and len(got) == 3
    model, tok = load_model(rm_dir, dtype="fp32", device="cpu")
    for p, c, r in zip(prompts, completions, got):  # batched with padding == one at a time
        ids = torch.tensor([tokenize_pair(p, c, tok, None)["input_ids"]])
        with torch.no_grad():
            alone = sequence_rewards(model, lambda h: model.score(h).squeeze(-1), ids, torch.ones_like(ids))
        assert r == pytest.approx(alone.item(), abs=1e-4)
    assert len(set(round(x, 4) for x in got)) == 3  # the head does separate the completions
    with pytest.raises(ValueError, match="not a reward model"):
        reward_model_reward(TINY)


def test_grpo_and_nash_md_feeds_take_the_reward_model(rm_dir):
    model, tok = load_model(TINY, dtype="fp32", device="cpu")
    opts = ["method.reward=[reward_model]", f"method.reward_model={rm_dir}", "method.reward_weights=null",
            "method.num_generations=2", "method.prompts_per_step=2", "method.max_new_tokens=8"]
    metrics = make_feed(["method=grpo", *opts], tok, n_rows=8).next_step(model).metrics
    assert "rewards/reward_model/mean" in metrics and metrics["reward"] == pytest.approx(metrics["rewards/reward_model/mean"])
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    f = make_feed(["method=nash_md", *opts], tok, n_rows=8)
    f.use_reference(ref)
    assert f.mode == "sigmoid"  # auto: Bradley-Terry probabilities for a reward model
    step = f.next_step(model)
    micro, metrics = step.micro_batches, step.metrics
    prefs = torch.stack([s.preference for mb in micro for s in mb])
    assert ((prefs > 0) & (prefs < 1)).all() and "rewards/reward_model/mixture" in metrics


def test_grpo_run_with_a_reward_model_logs_its_rewards(tmp_path, rm_dir):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", "progress=false",
           "eval_before=false", "eval_max_examples=8", "method=grpo", "method.reward=[reward_model]",
           f"method.reward_model={rm_dir}", "method.reward_weights=[1.0]", "method.max_steps=2",
           "method.prompts_per_step=2", "method.num_generations=2", "method.max_new_tokens=8",
           "data.eval.style=null", "data.eval.harmful=null", "data.eval.sft=null", "data.eval.preference=null"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    assert all(r["reward"] == pytest.approx(r["rewards/reward_model/mean"]) for r in lines)
    assert "accuracy" in json.loads((run_dir / "eval.json").read_text())["after"]
