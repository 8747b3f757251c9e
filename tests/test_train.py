"""train.py end to end on the embedded model: the run-directory contract (README, "A run writes"),
and the plug-in shape: a method, a task and a config key added without editing the tree."""
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


MY_LOSS = '''
from losses.common import masked_mean


def doubled_nll_loss(logp, mask, weight: float = 1.0):
    """weight x the token-mean NLL: a new method on the `tokens` kind."""
    nll = masked_mean(-logp, mask)
    return weight * nll, {"nll": nll.detach(), "weight": weight}
'''

MY_METHOD = '''
defaults: [_tokens, _self_]
name: doubled
loss: my_losses:doubled_nll_loss
data_format: sft
loss_args: {weight: 2.0}
batch_size: 4
'''

MY_TASK = '''
from tasks import GenerationTask, rate


class ShortAnswers(GenerationTask):
    """Share of greedy replies of at most `max_chars` characters."""
    data_format = "prompt"
    metrics = ("short_rate",)
    verdicts = ("short",)

    def configure(self, max_chars: int = 12):
        self.max_chars = max_chars

    def judge_all(self, texts, rows):
        return {"short": [len(t) <= self.max_chars for t in texts]}

    def summarise(self, v):
        return {"short_rate": rate(v["short"])}
'''


def plugin_dir(tmp_path, method_yaml=MY_METHOD):
    """A user's own directory: a loss file, a method YAML and a task file, nothing in the repository."""
    user = tmp_path / "user"
    (user / "configs" / "method").mkdir(parents=True)
    (user / "my_losses.py").write_text(MY_LOSS)
    (user / "my_task.py").write_text(MY_TASK)
    (user / "configs" / "method" / "doubled.yaml").write_text(method_yaml)
    return user


def run_user(tmp_path, user, *overrides):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", "progress=false",
           "eval_max_examples=8", f"hydra.searchpath=[file://{user / 'configs'}]", *overrides]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(user)})
    return run_dir, out


def test_a_new_method_is_a_loss_file_and_a_yaml(tmp_path):
    user = plugin_dir(tmp_path)
    run_dir, out = run_user(tmp_path, user, "method=doubled", "method.max_steps=3", "eval_before=false",
                            "data.eval.style=null", "data.eval.harmful=null", "data.eval.preference=null")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert all(r["weight"] == 2.0 and r["loss"] == pytest.approx(2 * r["nll"], rel=1e-5) for r in lines)
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").exists()


def test_a_new_task_is_one_file_and_a_config_entry(tmp_path):
    user = plugin_dir(tmp_path)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "What is 2 + 3?", "answer": "Answer: 5"}\n{"prompt": "What is 7 - 1?", "answer": "6"}\n')
    run_dir, out = run_user(tmp_path, user, "method=sft", "method.max_steps=1", "method.batch_size=4",
                            "data.eval.style=null", "data.eval.harmful=null", "data.eval.sft=null",
                            "data.eval.preference=null", "data.eval.arithmetic=null",
                            f"+data.eval.brief={{task: my_task:ShortAnswers, path: {qa}, max_chars: 40}}",
                            f"+data.eval.qa={{task: exact_match, path: {qa}, match: numeric}}")
    assert out.returncode == 0, out.stderr[-3000:]
    ev = json.loads((run_dir / "eval.json").read_text())
    for when in ("before", "after"):
        assert set(ev[when]) == {"brief/short_rate", "qa/exact_match"}
        assert 0.0 <= ev[when]["brief/short_rate"] <= 1.0 and 0.0 <= ev[when]["qa/exact_match"] <= 1.0


def test_a_misspelt_key_in_a_method_yaml_fails_before_anything_is_loaded(tmp_path):
    user = plugin_dir(tmp_path, MY_METHOD + "lrr: 1.0e-5\n")
    run_dir, out = run_user(tmp_path, user, "method=doubled")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "method=doubled: method.lrr: unknown option (did you mean 'lr'?)" in out.stderr
    assert "[posttrain]" not in out.stdout  # nothing was loaded
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_the_loop_names_no_method_and_no_kind():
    """The training loop and the train program ask the feed; they never test a kind or a loss type."""
    from trainer.config import OPTIONS, _load_kinds

    _load_kinds()
    names = set(OPTIONS) | {"grpo", "dapo", "dr_grpo", "bnpo", "dpo", "sft", "kto", "nash_md", "reward"}
    for path in ("trainer/loop.py", "trainer/run.py"):
        code = open(os.path.join(REPO, path), encoding="utf-8").read()
        quoted = [n for n in names if f'"{n}"' in code or f"'{n}'" in code]
        assert quoted == [], (path, quoted)
