"""train.py end to end on the embedded model: the run-directory contract of DESIGN.md."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", "progress=false",
           "eval_max_examples=16", *overrides]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, out


def test_sft_run_writes_metrics_eval_and_a_loadable_checkpoint(tmp_path):
    # run from another cwd: relative paths in the configs resolve against the repository
    run_dir, _ = run_train(tmp_path, "method=sft", "method.max_steps=4", "method.batch_size=4")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert all("loss" in r and r["loss"] > 0 for r in lines)
    ev = json.loads((run_dir / "eval.json").read_text())
    for when in ("before", "after"):
        assert {"accuracy", "format_rate", "style_rate", "refusal_rate", "perplexity"} <= set(ev[when])
    from model.load import load_model

    final = run_dir / "checkpoints" / "final"
    model, tok = load_model(str(final), dtype="fp32", device="cpu")
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                add_generation_prompt=True, tokenize=True)])
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final)).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_bad_training_file_is_a_clear_error_and_writes_no_checkpoint(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": "hi"}\n')
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "progress=false",
           "eval_before=false", f"data.train={bad}", "method.max_steps=1"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"{bad}:2: field 'output'" in out.stderr + out.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("method,extra", [("dpo", ["method.precompute_ref=true"]), ("kto", [])])
def test_preference_run_logs_reward_metrics_and_reports_gates(tmp_path, method, extra):
    run_dir, out = run_train(tmp_path, f"method={method}", "method.max_steps=2", "method.batch_size=4",
                             "data.eval.arithmetic=null", "data.eval.style=null", "data.eval.harmful=null", *extra)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/margins" in r and "kl" in r for r in lines)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["before"]["preference_accuracy"] == 0.5 and ev["before"]["kl"] == 0.0  # the start is its own reference
    assert set(ev["gates"]) == {"preference_gap", "kl"}
    assert all(isinstance(g["pass"], bool) for g in ev["gates"].values())
    assert "gate kl:" in out.stdout


def test_reward_model_run_saves_a_sequence_classification_checkpoint(tmp_path):
    run_dir, _ = run_train(tmp_path, "method=reward", "method.max_steps=2", "method.batch_size=4")
    ev = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= ev["after"]["preference_accuracy"] <= 1.0
    from losses.reward import sequence_rewards
    from model.load import load_model

    final = str(run_dir / "checkpoints" / "final")
    model, tok = load_model(final, dtype="fp32", device="cpu")
    assert hasattr(model, "score")  # detected from config.json's *ForSequenceClassification
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"},
                                                 {"role": "assistant", "content": "Answer: 7"}], tokenize=True)])
    with torch.no_grad():
        ours = sequence_rewards(model, lambda h: model.score(h).squeeze(-1), ids, torch.ones_like(ids))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final).float().eval()
    with torch.no_grad():
        theirs = hf(ids).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_nash_md_run_trains_on_policy_vs_mixture_pairs(tmp_path):
    run_dir, _ = run_train(tmp_path, "method=nash_md", "method.max_steps=2", "method.prompts_per_step=2",
                           "method.num_generations=2", "method.max_new_tokens=8", "data.eval.style=null",
                           "data.eval.harmful=null", "data.eval.sft=null", "data.eval.preference=null")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    for r in lines:
        assert {"loss", "reward", "reward_mixture", "rewards/probabilities", "kl", "entropy"} <= set(r)
        assert 0.0 <= r["rewards/probabilities"] <= 1.0
    ev = json.loads((run_dir / "eval.json").read_text())
    assert "accuracy" in ev["before"] and "accuracy" in ev["after"]
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()
