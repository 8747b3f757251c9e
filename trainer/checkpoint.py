"""Crash-safe training checkpoints and exact resume (`checkpoint_every=N`, `resume=true|DIR`).

    DIR/checkpoints/step_00000040/
        model_rank0.safetensors      this rank's shard of the trainable parameters
        optim_rank0.safetensors      this rank's shard of AdamW's moments (and step counts)
        state_rank0.json             the rest: optimiser param groups, the next step, the feed's data
                                     position, the RNG states, the skipped-step count, the "before"
                                     evaluation; tensors in it point into state_rank0.safetensors
        state_rank0.safetensors
    (one set of files per rank under torchrun; the same world size resumes it)

No pickle anywhere: a checkpoint directory is data (safetensors and JSON), so resuming from one a
stranger sent cannot run code. torch.distributed.checkpoint is not used because its `.metadata`
file is a pickle; torch.load is not used at all.

Why it is crash-safe: everything is written into `DIR/checkpoints/.tmp-step_00000040`, each file is
fsync'ed by the rank that wrote it (never by walking the directory: another rank may be writing into it,
and safetensors writes through a `.tmpXXXXXX` file that it renames, so an entry listed a moment ago
can be gone when it is opened), then the directory itself, and only then is the directory renamed to
`step_00000040` (rename is atomic on POSIX). A run
killed at any instant leaves either the new complete checkpoint or none; `latest()` never looks at
`.tmp-*` directories and the next save deletes them. After a new checkpoint is complete the oldest
ones beyond `keep` are removed, so the previous one survives until its successor exists.

Why resume is exact: besides the weights and AdamW's moments, the checkpoint holds the position of
the data order (the shuffling generator's state, the order and the cursor, a rollout batch that is
being reused), the Python and torch RNG states (dropout, sampling), and the step, from which the
learning-rate schedule is a pure function. On CPU a resumed run reproduces the uninterrupted run's
losses bit for bit (tests/test_resume.py). Only trainable parameters are saved: frozen weights (an
adapter run's base, NF4 codes) are reloaded from `model.path` as at the start. A checkpoint is never
written from non-finite weights: `save` checks first and raises.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from trainer import distributed

PREFIX = "step_"
FORMAT = "posttrain-checkpoint-v2"
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


# ============================================================================ data <-> JSON + tensors
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def to_plain(obj, tensors: dict):
    """A JSON-able copy of obj; every tensor is moved into `tensors` and replaced by a reference."""
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = _local(obj).detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [to_plain(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: to_plain(v, tensors) for k, v in obj.items()}
        return {"__items__": [[to_plain(k, tensors), to_plain(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state holds a {type(obj).__name__}; only tensors, numbers, strings, lists, "
                    "tuples and dicts can be stored")


def from_plain(obj, tensors: dict, where: str):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise ValueError(f"{where}: tensor {obj['__tensor__']!r} is missing")
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(from_plain(v, tensors, where) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {from_plain(k, tensors, where): from_plain(v, tensors, where) for k, v in obj["__items__"]}
        return {k: from_plain(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v, tensors, where) for v in obj]
    return obj


def write_state(directory: str, name: str, state: dict) -> list[str]:
    """`name`.json + `name`.safetensors: the state as data. Returns the two paths."""
    tensors: dict = {}
    plain = to_plain(state, tensors)
    paths = [os.path.join(directory, f"{name}.safetensors"), os.path.join(directory, f"{name}.json")]
    save_file(tensors, paths[0])
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "state": plain}, f)
    return paths


def read_state(directory: str, name: str) -> dict:
    path = os.path.join(directory, f"{name}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {name}.json: not a posttrain checkpoint of this version "
                                f"(written with {distributed.world_size()} processes?)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        tensors = load_file(os.path.join(directory, f"{name}.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable checkpoint state ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return from_plain(doc["state"], tensors, path)


# ============================================================================ save / load
def nonfinite_parameters(model) -> list[str]:
    """Names of trainable parameters holding NaN or inf (this rank's shard)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(_local(p)).all()]


def _fsync(path: str) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
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
    r = distributed.rank()
    weights = os.path.join(tmp, f"model_rank{r}.safetensors")
    save_file({k: _local(v).detach().cpu().contiguous() for k, v in model_sd.items()}, weights)
    written = [weights, *write_state(tmp, f"optim_rank{r}", optim_sd),
               *write_state(tmp, f"state_rank{r}", {**trainer_state, "world": distributed.world_size()})]
    for path in written:  # this rank's own files only: the others may still be writing theirs (see above)
        _fsync(path)
    distributed.barrier()
    if distributed.is_main():
        _fsync(tmp)  # every rank's entries, now that all are written
        if os.path.exists(final):  # the same step saved again (a resumed run): the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)  # the rename itself
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
    state = read_state(path, f"state_rank{distributed.rank()}")
    if state.get("world") != distributed.world_size():
        raise ValueError(f"{path}: written by {state.get('world')} processes, resumed with "
                         f"{distributed.world_size()}; resume with the same number of processes")
    return state


def _copy_into(template, loaded, where: str):
    """Copy saved values into the current state dict's tensors (local shards of DTensors in place)."""
    if torch.is_tensor(template):
        if not torch.is_tensor(loaded):
            raise ValueError(f"{where}: expected a tensor in the checkpoint")
        dst = _local(template)
        if dst.shape != loaded.shape:
            raise ValueError(f"{where}: shape {tuple(loaded.shape)} in the checkpoint, {tuple(dst.shape)} in the model")
        dst.copy_(loaded)
        return template
    if isinstance(template, dict):
        if not isinstance(loaded, dict):
            raise ValueError(f"{where}: expected a mapping in the checkpoint")
        return {k: _copy_into(template[k], loaded[k], f"{where}.{k}") if k in template else loaded[k]
                for k in loaded}
    return loaded


def load(path: str, model, optimizer) -> dict:
    """Restore model and optimiser in place from checkpoint `path`; returns this rank's trainer state."""
    state = trainer_state(path)
    r = distributed.rank()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_SAVE)
    weights_path = os.path.join(path, f"model_rank{r}.safetensors")
    try:
        weights = load_file(weights_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{weights_path}: unreadable checkpoint weights ({e})") from None
    missing, extra = sorted(set(model_sd) - set(weights)), sorted(set(weights) - set(model_sd))
    if missing or extra:
        raise ValueError(f"{weights_path}: does not match the model's trainable parameters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); resume with the same method, model and adapters")
    with torch.no_grad():
        model_sd = _copy_into(model_sd, weights, weights_path)
        optim_sd = _copy_into(optim_sd, read_state(path, f"optim_rank{r}"), os.path.join(path, f"optim_rank{r}"))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_LOAD)
    return state
