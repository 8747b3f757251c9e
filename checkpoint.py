"""Crash-safe training checkpoints and exact resume (`checkpoint_every=N`, `resume=true|DIR`).

    DIR/checkpoints/step_00000040/
        .metadata, __0_0.distcp ...   model (trainable parameters only) and optimiser state, written by
                                      torch.distributed.checkpoint: one shard file per rank
        trainer_rank0.pt ...          per rank: the next step, the data position, the RNG states, the
                                      skipped-step count and the "before" evaluation

Why it is crash-safe: everything is written into `DIR/checkpoints/.tmp-step_00000040`, each file is
fsync'ed, and only then is the directory renamed to `step_00000040` (rename is atomic on POSIX). A run
killed at any instant leaves either the new complete checkpoint or none; `latest()` never looks at
`.tmp-*` directories and the next save deletes them. After a new checkpoint is complete the oldest
ones beyond `keep` are removed, so the previous one survives until its successor exists.

Why resume is exact: besides the weights and AdamW's moments, the checkpoint holds the position of
the data order (the shuffling generator's state, the order and the cursor), the Python and torch
RNG states (dropout, sampling), and the step, from which the learning-rate schedule is a pure
function. On CPU a resumed run reproduces the uninterrupted run's losses bit for bit
(tests/test_resume.py). Only trainable parameters are saved: frozen weights (an adapter run's
base, NF4 codes) are reloaded from `model.path` as at the start.

The same code runs on one process (the checkpoint is then one shard) and under torchrun with FSDP2
(each rank writes its shard; a shared filesystem is assumed across nodes). A checkpoint is never
written from non-finite weights: `save` checks first and raises.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import distributed

PREFIX = "step_"
_SAVE = StateDictOptions(ignore_frozen_params=True)
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:08d}")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def nonfinite_parameters(model) -> list[str]:
    """Names of trainable parameters holding NaN or inf (this rank's shard)."""
    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            if not torch.isfinite(local).all():
                bad.append(name)
    return bad


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save(root: str, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> str:
    """Write the checkpoint for `step` atomically; returns its directory. Every rank must call it."""
    bad = nonfinite_parameters(model)
    if not distributed.all_true(not bad):
        raise FloatingPointError(f"step {step}: refusing to checkpoint non-finite parameters {bad[:5]}")
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp-{PREFIX}{step:08d}")
    if distributed.is_main():
        for stale in glob.glob(os.path.join(root, ".tmp-*")):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_SAVE)
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=distributed.world_size() == 1)
    torch.save(trainer_state, os.path.join(tmp, f"trainer_rank{distributed.rank()}.pt"))
    _fsync_tree(tmp)
    distributed.barrier()
    if distributed.is_main():
        if os.path.exists(final):  # the same step saved again (a resumed run): the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in sorted(glob.glob(os.path.join(root, f"{PREFIX}*")))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def latest(path: str) -> str | None:
    """The newest complete checkpoint under a run directory, a checkpoints directory, or `path` itself."""
    if os.path.basename(os.path.normpath(path)).startswith(PREFIX) and os.path.isdir(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = sorted(d for d in glob.glob(os.path.join(root, f"{PREFIX}*")) if os.path.isdir(d))
        if found:
            return found[-1]
    return None


def trainer_state(path: str) -> dict:
    """This rank's trainer state in checkpoint `path` (step, data position, RNG, ...)."""
    trainer = os.path.join(path, f"trainer_rank{distributed.rank()}.pt")
    if not os.path.isfile(trainer):
        raise FileNotFoundError(f"{path}: no {os.path.basename(trainer)} (was it written with "
                                f"{distributed.world_size()} processes?)")
    return torch.load(trainer, weights_only=False)


def load(path: str, model, optimizer) -> dict:
    """Restore model and optimiser in place from checkpoint `path`; returns this rank's trainer state."""
    state = trainer_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_SAVE)
    saved = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(saved, checkpoint_id=path, no_dist=distributed.world_size() == 1)
    set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optim"], options=_LOAD)
    return state
