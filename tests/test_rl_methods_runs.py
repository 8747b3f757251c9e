"""The new RL methods as configs on the existing kinds (gspo, cispo, rloo, reinforce_pp) and the
distillation kind (opd, gkd): each trains through train.py and logs its own diagnostics."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_feed
from losses.advantages import reinforce_pp_baseline_advantages, rloo_advantages
from trainer.config import ConfigError, compose
from trainer.paths import REPO

SMALL = ["method.max_steps=2", "method.prompts_per_step=2", "method.num_generations=4", "method.max_new_tokens=8"]
ONLY_ARITHMETIC = ["data.eval.style=null", "data.eval.harmful=null", "data.eval.sft=null", "data.eval.preference=null"]


@pytest.mark.parametrize("method, keys", [
    ("gspo", {"seq_ratio/min", "seq_ratio/mean", "seq_ratio/max"}),
    ("cispo", {"cispo_clip_ratio"}),
    ("rloo", {"kl"}),
    ("reinforce_pp", {"clip_ratio/region"}),
    ("opd", {"reverse_kl"}),
    ("gkd", {"jsd", "reverse_kl", "forward_kl"}),
])
def test_method_trains_through_train_py_and_logs_its_diagnostics(tmp_path, method, keys):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"method={method}", f"hydra.run.dir={run_dir}",
           "progress=false", "eval_max_examples=8", "eval_before=false", *SMALL, *ONLY_ARITHMETIC]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    for r in lines:
        assert keys <= set(r), sorted(r)
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in keys)
    assert "accuracy" in json.loads((run_dir / "eval.json").read_text())["after"]


def test_the_advantage_estimator_is_chosen_by_config(tiny):
    model, tok = tiny
    for method, estimator in (("rloo", rloo_advantages), ("reinforce_pp", reinforce_pp_baseline_advantages)):
        f = make_feed([f"method={method}", "method.reward_kl=0", *SMALL], tok, n_rows=12)
        f.use_reference(None)
        episodes = [e for mb in f.next_step(model).micro_batches for e in mb]
        rewards = torch.tensor([e.reward for e in episodes])
        got = torch.stack([e.advantage for e in episodes])
        torch.testing.assert_close(got, estimator(rewards, 4))


def test_rloo_folds_the_reference_kl_into_the_reward(tiny):
    """With the policy as its own reference the KL is 0 and the rewards are the plain ones; a moved
    policy lowers them by beta x its sequence log-ratio."""
    import copy

    model, tok = tiny
    f = make_feed(["method=rloo", *SMALL], tok, n_rows=12)
    f.use_reference(model)
    same = [e.reward for mb in f.next_step(model).micro_batches for e in mb]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.model.norm.weight.mul_(1.5)
    g = make_feed(["method=rloo", *SMALL], tok, n_rows=12)
    g.use_reference(model)
    shifted = [e.reward for mb in g.next_step(moved).micro_batches for e in mb]
    assert all(r in (0.0, 1.0, 1.1, 0.1) or abs(r - round(r, 1)) < 1e-5 for r in same)
    assert any(abs(r - round(r, 1)) > 1e-3 for r in shifted)
    with pytest.raises(ConfigError, match="reward_kl"):
        compose(["method=rloo", "method.reference=false"])


@pytest.mark.parametrize("method, zero_key", [("opd", "reverse_kl"), ("gkd", "jsd")])
def test_a_student_distilled_from_itself_gets_no_signal(tiny, method, zero_key):
    """Teacher = student: the per-token reverse KL (OPD) and the JSD (GKD) are 0, and so is the gradient."""
    from losses import call_loss

    model, tok = tiny
    f = make_feed([f"method={method}", "method.teacher=assets/tiny-qwen3", "method.lmbda=1.0", *SMALL], tok, n_rows=8)
    f.setup_model(model)
    step = f.next_step(model)
    model.zero_grad()
    for micro, weight in zip(step.micro_batches, step.weights):
        inputs, _, _ = f.loss_inputs(model, None, micro)
        loss, metrics = call_loss(f.loss_fn, inputs, f.m.loss_args)
        (loss * weight).backward()
        assert abs(float(metrics[zero_key])) < 1e-5
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-4
    model.zero_grad()


def test_a_teacher_with_another_tokenizer_is_refused(tiny, tmp_path, tiny_tokenizer):
    from model.load import save_model

    model, tok = tiny
    other = tmp_path / "other"
    save_model(model, str(other), tiny_tokenizer)  # same weights, a different tokenizer
    f = make_feed(["method=opd", f"method.teacher={other}", *SMALL], tok, n_rows=8)
    with pytest.raises(ConfigError, match="tokenizer or vocabulary differs"):
        f.setup_model(model)
