"""Bad config values, faults and interrupted writes: one line on stderr, exit 1, nothing half-written.

Each case was a silent default, a traceback or a result on disk without its model before the typed
configs (trainer/config.py) and the checks in trainer/run.py, trainer/models.py and train.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from trainer.config import ConfigError, compose
from trainer.paths import REPO, repo_path

QUIET = ["progress=false", "eval_max_examples=4"]


def run(tmp_path, *overrides, env=None):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *QUIET, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def one_line_error(out) -> str:
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("overrides, message", [
    (["method.lr=abc"], "method.lr: expected a number, got 'abc'"),
    (["method.grad_accum=0"], "method.grad_accum: must be >= 1, got 0"),
    (["method=dpo", "method.batch_size=0"], "method.batch_size: must be >= 1, got 0"),
    (["method.max_steps=0"], "method.max_steps: must be >= 1, got 0"),     # ran 750 steps
    (["method.max_steps=-5"], "method.max_steps: must be >= 1, got -5"),   # trained nothing, exit 0
    (["method.epochs=0"], "method.epochs: must be >= 1, got 0"),
    (["method=grpo", "method.reward_weights=[1.0]"], "1 weights for 2 rewards"),  # dropped `format` silently
    (["data.max_length=-3"], "data.max_length: must be >= 1, got -3"),
    (["checkpoint_every=-1"], "checkpoint_every: must be >= 0, got -1"),
    (["skip_budget=-2"], "skip_budget: must be >= 0, got -2"),
    (["method=dpo", "method.loss_args.beta=-"], "method.loss_args.beta: expected a number"),
    (["method=grpo", "method.loss_args.loss_type=dpo"], "method.loss_args.loss_type: expected one of"),
])
def test_bad_config_values_are_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        compose(overrides)


@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("tpu9", "not a device name")])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(run(tmp_path, f"device={device}", "method.max_steps=1"))
    assert message in line


def test_a_misspelt_command_line_key_is_refused(tmp_path):
    out = run(tmp_path, "+method.lrr=1e-5")
    assert "method.lrr: unknown option (did you mean 'lr'?)" in one_line_error(out)


def test_non_finite_weights_are_never_saved_and_eval_json_claims_nothing(tmp_path):
    """lr=1e38 makes every weight inf after one step; it used to exit 0 with 46 inf tensors in
    checkpoints/final (and eval.json beside them)."""
    line = one_line_error(run(tmp_path, "method.max_steps=1", "method.lr=1e38", "eval_before=false", "eval_after=false"))
    assert "refusing to save" in line and "NaN or inf" in line
    assert not (tmp_path / "run" / "checkpoints" / "final").exists()
    assert not (tmp_path / "run" / "eval.json").exists()  # a directory never claims a result it does not hold


def test_a_run_directory_that_cannot_be_written_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={blocker / 'run'}", *QUIET]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "cannot create or write the run directory" in one_line_error(out)


def test_the_final_export_replaces_the_old_one_atomically(tmp_path, monkeypatch):
    """method.export copies checkpoints/final elsewhere (assets/tiny-qwen3 for the embedded model);
    a crash in the middle of the copy used to leave 3 of 6 files. Now the old export survives."""
    from model.load import load_model
    from trainer import models

    cfg = compose(["method=sft", f"method.export={tmp_path / 'export'}"])
    model, tok = load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu")
    models.save_final(model, cfg, tok, str(tmp_path / "run"), False, torch.float32)
    before = sorted(os.listdir(tmp_path / "export"))
    assert "model.safetensors" in before

    def dies_halfway(src, dst, **kw):
        os.makedirs(dst)
        open(os.path.join(dst, "config.json"), "w").close()
        raise KeyboardInterrupt  # a kill in the middle of the copy

    monkeypatch.setattr(models.shutil, "copytree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.save_final(model, cfg, tok, str(tmp_path / "run"), False, torch.float32)
    assert sorted(os.listdir(tmp_path / "export")) == before
    load_model(str(tmp_path / "export"), dtype="fp32", device="cpu")  # still whole


def test_out_of_memory_on_cpu_gets_the_report_too(tmp_path):
    """The CPU allocator raises a plain RuntimeError, which skipped the out-of-memory report."""
    (tmp_path / "cpuoom.py").write_text(
        "def oom(logp, mask):\n"
        "    raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can\\'t allocate memory: "
        "you tried to allocate 52549024768000 bytes.')\n")
    out = run(tmp_path, "method.loss=cpuoom:oom", "method.max_steps=1", "eval_before=false", env={"PYTHONPATH": str(tmp_path)})
    line = one_line_error(out)
    assert "out of memory at step 0, micro-batch 0" in line and "method.batch_size=" in line


def test_repo_path_leaves_hub_ids_alone(tmp_path, monkeypatch):
    """model=qwen3-0.6b (path Qwen/Qwen3-0.6B) was joined with the repository root and then not found."""
    monkeypatch.chdir(tmp_path)
    assert repo_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert repo_path("assets/tiny-qwen3") == os.path.join(REPO, "assets", "tiny-qwen3")
    assert compose(["model=qwen3-0.6b"]).model.path == "Qwen/Qwen3-0.6B"


def test_the_metrics_and_eval_of_a_finished_run_are_written(tmp_path):
    out = run(tmp_path, "method.max_steps=1", "method.batch_size=4", "data.eval.preference=null", "data.eval.sft=null")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["after"]
