"""Crash-safe checkpoints, exact resume and the training guards (trainer/checkpoint.py, trainer/loop.py).

- a run resumed from a mid-run checkpoint reproduces the uninterrupted run's losses exactly (CPU),
  for SFT (data order) and GRPO (rollout buffer reused across num_iterations, sampling seeds);
- a process killed with SIGKILL while writing a checkpoint leaves the previous one complete and
  loadable, and the half-written one is never picked;
- a planted NaN loss is reported with its step and examples, the step is skipped, and no checkpoint
  holds a non-finite weight; past the skip budget the run stops;
- out of memory is reported with the batch shape and the knobs to turn;
- a checkpoint directory is data: one holding pickles that run code is refused, never executed.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["progress=false", "eval_before=false", "eval_after=false"]


def train(run_dir, *overrides, env=None, check=True):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]


def resume_matches(tmp_path, overrides, at):
    """Run to the end with checkpoints; copy the run as it was at checkpoint `at` (its checkpoint and
    the metrics lines before it, as a kill right after it would leave them); resume; compare."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full, *overrides)
    ckpt = f"step_{at:08d}"
    assert (full / "checkpoints" / ckpt).is_dir()
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / ckpt, cut / "checkpoints" / ckpt)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:at + 2]) + "\n")  # plus lines the killed run wrote after it
    out = train(cut, *overrides, "resume=true")
    assert f"resumed from {cut / 'checkpoints' / ckpt} at step {at}" in out.stdout
    return losses(full), losses(cut)


def test_resumed_sft_run_reproduces_the_losses_exactly(tmp_path):
    full, resumed = resume_matches(tmp_path, ["method=sft", "method.max_steps=6", "method.batch_size=4",
                                              "checkpoint_every=2", "keep_checkpoints=3"], at=2)
    assert len(full) == 6
    assert resumed == full  # bit for bit: weights, AdamW moments, data order, RNG and schedule restored


def test_resumed_grpo_run_reproduces_the_losses_exactly(tmp_path):
    # num_iterations=2 with a checkpoint after step 3: the resumed run must reuse the kept rollout batch
    full, resumed = resume_matches(tmp_path, ["method=grpo", "method.max_steps=5", "method.prompts_per_step=2",
                                              "method.num_generations=4", "method.num_iterations=2",
                                              "method.max_new_tokens=8", "checkpoint_every=3"], at=3)
    assert len(full) == 5
    assert resumed == full


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    out = train(tmp_path / "run", "method=sft", "method.max_steps=1", "resume=true", check=False)
    assert out.returncode == 1
    assert "resume: no complete checkpoint under" in out.stderr


KILLER = r"""
import os, sys, time, torch
from trainer import checkpoint
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 4)).sum().backward(); opt.step()
checkpoint.save({root!r}, 1, model, opt, {{"step": 1}})
with torch.no_grad():
    model.weight.fill_(7.0)
real_write = checkpoint.write_state
def stalled_write(directory, name, state):  # the weights are on disk, the trainer state is being written
    if name.startswith("state_"):
        open(os.path.join({root!r}, "writing"), "w").close()
        time.sleep(600)
    return real_write(directory, name, state)
checkpoint.write_state = stalled_write
checkpoint.save({root!r}, 2, model, opt, {{"step": 2}})
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    from trainer import checkpoint

    root = str(tmp_path / "checkpoints")
    proc = subprocess.Popen([sys.executable, "-c", KILLER.format(repo=REPO, root=root)])
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(root, "writing")):
        assert proc.poll() is None and time.time() < deadline, "the writer died or never started step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(name.startswith(".tmp-") for name in os.listdir(root))  # step 2 was half written
    path = checkpoint.latest(str(tmp_path))
    assert path == os.path.join(root, "step_00000001")
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    state = checkpoint.load(path, model, opt)
    assert state == {"step": 1, "world": 1}
    assert not torch.all(model.weight == 7.0) and torch.isfinite(model.weight).all()
    checkpoint.save(root, 3, model, opt, {"step": 3})  # the next save clears the debris
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000003", "writing"]


def test_a_save_never_opens_files_another_rank_is_still_writing(tmp_path, monkeypatch):
    # Under torchrun every rank writes into the same .tmp-step_* directory at once, and safetensors
    # writes through a `.tmpXXXXXX` file that it renames when done: an entry a rank lists can be gone
    # when it opens it. Walking the directory to fsync it failed the run ("No such file or directory:
    # .../.tmp-step_00000002/.tmpRa7n5D", one rank exits 1) when the ranks drifted apart under load.
    # Planted here: rank 1's in-flight temp file, already renamed away (a name that no longer opens).
    from trainer import checkpoint

    root = str(tmp_path / "checkpoints")
    real_save_file = checkpoint.save_file

    def save_file_beside_rank1(tensors, path):
        stale = os.path.join(os.path.dirname(path), ".tmpRank1")
        if not os.path.lexists(stale):
            os.symlink(os.path.join(os.path.dirname(path), "model_rank1.safetensors.gone"), stale)
        return real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file_beside_rank1)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    path = checkpoint.save(root, 1, model, opt, {"step": 1})
    assert path == os.path.join(root, "step_00000001") and os.path.isfile(os.path.join(path, "model_rank0.safetensors"))
    fresh = torch.nn.Linear(4, 4)
    assert checkpoint.load(path, fresh, torch.optim.AdamW(fresh.parameters())) == {"step": 1, "world": 1}
    assert torch.equal(fresh.weight, model.weight)


NAN_LOSS = """
import torch
from losses.sft import sft_loss
calls = 0
def planted(logp, mask):
    global calls
    calls += 1
    loss, metrics = sft_loss(logp, mask)
    return (loss * float("nan"), metrics) if calls == 3 else (loss, metrics)
"""


@pytest.mark.parametrize("budget", [1, 0])
def test_a_planted_nan_is_reported_skipped_and_never_checkpointed(tmp_path, budget):
    (tmp_path / "nanloss.py").write_text(NAN_LOSS)
    run_dir = tmp_path / "run"
    out = train(run_dir, "method=sft", "method.loss=nanloss:planted", "method.max_steps=5", "method.batch_size=4",
                "checkpoint_every=1", "keep_checkpoints=10", f"skip_budget={budget}",
                env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert "step 2: non-finite loss (nan)" in out.stderr and "examples [" in out.stderr
    from trainer import checkpoint
    from model.load import load_model

    ckpts = sorted(d for d in os.listdir(run_dir / "checkpoints") if d.startswith("step_"))
    for name in ckpts:  # every checkpoint holds finite weights
        model, _ = load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu")
        opt = torch.optim.AdamW(model.parameters())
        checkpoint.load(str(run_dir / "checkpoints" / name), model, opt)
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
    if budget == 1:
        assert out.returncode == 0, out.stderr[-2000:]
        assert ckpts == ["step_00000001", "step_00000002", "step_00000003", "step_00000004"]
        skipped = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in skipped if "skipped" in r] == [2]
        final, _ = load_model(str(run_dir / "checkpoints" / "final"), dtype="fp32", device="cpu")
        assert all(torch.isfinite(p).all() for p in final.parameters())
    else:
        assert out.returncode == 1 and "skip budget exhausted" in out.stderr
        assert "Traceback" not in out.stderr
        assert ckpts == ["step_00000001", "step_00000002"]  # nothing after the bad step
        assert not (run_dir / "checkpoints" / "final").exists()


OOM_LOSS = """
import torch
def oom(logp, mask):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
"""


def test_out_of_memory_reports_the_batch_shape_and_the_knobs(tmp_path):
    (tmp_path / "oomloss.py").write_text(OOM_LOSS)
    out = train(tmp_path / "run", "method=sft", "method.loss=oomloss:oom", "method.max_steps=2", "method.batch_size=4",
                env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "out of memory at step 0, micro-batch 0: 4 sequences x" in out.stderr
    assert "method.batch_size=2 method.grad_accum=2" in out.stderr
    assert "model.gradient_checkpointing=true" in out.stderr


PAYLOAD = """
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def test_a_checkpoint_holding_pickles_is_refused_not_executed(tmp_path):
    """trainer state used to be a torch.load(weights_only=False) pickle, and torch.distributed.checkpoint
    reads its .metadata with pickle.load: resume=DIR on a stranger's directory ran their code. Now a
    checkpoint is safetensors + JSON; pickle files in it are never opened."""
    import pickle
    import types

    marker = tmp_path / "pwned"
    mod = types.ModuleType("payload")
    exec(PAYLOAD.format(marker=marker), mod.__dict__)
    ckpt = tmp_path / "evil" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    for name in ("trainer_rank0.pt", ".metadata", "__0_0.distcp"):
        (ckpt / name).write_bytes(pickle.dumps(mod.Payload()))
    out = train(tmp_path / "run", "method=sft", "method.max_steps=2", "method.batch_size=4",
                f"resume={tmp_path / 'evil'}", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not a posttrain checkpoint" in out.stderr
    assert not marker.exists()
