"""The train program: config -> model -> feed -> loop -> evaluation -> save.

    1. device and dtype (torchrun: one process group, FSDP2), a check that the run directory is writable
    2. the model and tokenizer (trainer/models.py), adapters when lora != none
    3. the feed of the method's kind reads and validates its data (trainer/feeds/), sets up the model
       (a reward head), and takes the reference (a frozen copy or the adapters-disabled base)
    4. eval.json "before" on the held-out tasks (tasks/; the feed may replace the evaluation)
    5. the shared loop (trainer/loop.py)
    6. "after", the gates, then checkpoints/final; eval.json is written last, so a directory with an
       eval.json always holds the model it describes
Every kind-specific decision is the feed's; this file names no method and no kind.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch

from data import hf
from evaluation.metrics import Evaluator, check_gates, gate_line, held_out_sets
from tasks.arithmetic import set_judge
from trainer import checkpoint, distributed, lineage
from trainer.feeds import get_feed
from trainer.loop import train_loop
from trainer.models import AdaptersDisabled, add_adapters, load, make_reference, save_final
from trainer.paths import repo_path
from trainer.trackers import open_trackers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_writable(run_dir: str, need_bytes: int = 0) -> None:
    """Fail before training, not after it, when the run directory cannot hold the results."""
    probe = os.path.join(run_dir, f".write-test-{os.getpid()}")  # one per process (torchrun ranks share run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{run_dir}: cannot create or write the run directory ({e.strerror})") from None
    free = shutil.disk_usage(run_dir).free
    if need_bytes and free < need_bytes:
        raise ValueError(f"{run_dir}: {free / 2**20:.0f} MiB free, the final model needs about "
                         f"{need_bytes / 2**20:.0f} MiB; free space or choose hydra.run.dir elsewhere")


def resume_checkpoint(cfg, run_dir: str) -> str | None:
    """`resume=true`: the newest checkpoint of this run directory; `resume=DIR`: of DIR (a run
    directory or a checkpoint). A resumed run in a new directory starts with the old metrics lines."""
    if cfg.resume in (False, "false", None):
        return None
    where = run_dir if cfg.resume in (True, "true") else repo_path(str(cfg.resume))
    path = checkpoint.latest(where)
    if path is None:
        raise FileNotFoundError(f"resume: no complete checkpoint under {where} (runs write them with "
                                "checkpoint_every=N; resume=true looks in hydra.run.dir, resume=DIR anywhere)")
    old_metrics = os.path.join(os.path.dirname(os.path.dirname(path)), "metrics.jsonl")
    new_metrics = os.path.join(run_dir, "metrics.jsonl")
    if distributed.is_main() and os.path.exists(old_metrics) and not os.path.exists(new_metrics):
        shutil.copyfile(old_metrics, new_metrics)
    return path


def write_json(path: str, obj) -> None:
    """Write `path` atomically (a kill leaves the old file or the new one)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def setup(cfg, run_dir: str):
    """Device, dtype and the model with its adapters: the part every program shares."""
    from model.load import resolve_device, resolve_dtype

    seed_everything(cfg.seed)
    set_judge(cfg.judge)  # the math judge of the reward and of accuracy, one for both
    hf.configure(cfg.data, {repo_path(v["path"]): v for v in held_out_sets(cfg).values()
                            if isinstance(v, dict) and "path" in v})  # split/subset/columns of dataset sources
    device = resolve_device(cfg.device)
    dist_device = distributed.init(cfg.device)  # torchrun with WORLD_SIZE > 1: FSDP2 data parallelism
    device = dist_device or device
    dtype = resolve_dtype(cfg.model.dtype)
    if distributed.world_size() > 1 and dtype != torch.float32:
        dtype = torch.float32  # FSDP keeps fp32 master weights and computes in bf16 (MixedPrecisionPolicy)
    check_writable(run_dir)
    model, tok = load(cfg, device, dtype)
    need = 2 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_writable(run_dir, need)
    if distributed.is_main():  # code, config, model and data hashes, machine, parent run: before any step
        lineage.write(cfg, run_dir, device)
    return model, tok, device, dtype


def train(cfg, run_dir: str) -> dict:
    world = distributed.world_size()
    model, tok, device, dtype = setup(cfg, run_dir)
    world = distributed.world_size()
    adapters = add_adapters(model, cfg)
    distributed.log(f"[posttrain] {cfg.method.name} on {device} ({dtype}){f' x {world} processes' if world > 1 else ''}"
                    f"; run dir {run_dir}")
    feed = get_feed(cfg.method.kind)(cfg, tok, device, distributed.rank(), world)
    feed.load(model, run_dir)
    feed.setup_model(model)
    ref = feed.use_reference(make_reference(model, cfg, adapters))
    if world > 1:
        distributed.shard(model, mixed_precision=device.type == "cuda")
        if ref is not None and not isinstance(ref, AdaptersDisabled):  # the frozen copy: 1/N per rank, not N copies
            distributed.shard(ref, mixed_precision=device.type == "cuda")
            distributed.log(f"[posttrain] frozen reference sharded over {world} processes")
    if cfg.model.compile:  # regional: each block compiled once and reused by every layer's call
        for layer in model.model.layers:
            layer.compile(dynamic=True)
        distributed.log(f"[posttrain] torch.compile: {len(model.model.layers)} transformer blocks (compiled on first use)")
    resume = resume_checkpoint(cfg, run_dir)
    evaluator = feed.evaluator(Evaluator(tok, held_out_sets(cfg), cfg.eval_max_examples))
    results = {}
    trackers = open_trackers(cfg.logger, run_dir, main=distributed.is_main())  # rank 0 only; none by default
    try:
        trackers.log_config(lineage.config_dict(cfg))
        before = checkpoint.trainer_state(resume).get("before") if resume else None
        if before is not None:
            results["before"] = before  # measured on the same start by the first run
        elif cfg.eval_before:
            results["before"] = evaluator(model)
            distributed.log(f"[posttrain] before: {results['before']}")
        steps = train_loop(model, ref, feed, cfg, run_dir, device, resume=resume, before=results.get("before"),
                           evaluate=evaluator, trackers=trackers)
        if cfg.eval_after:
            results["after"] = evaluator(model)
            if cfg.method.gates:
                results["gates"] = check_gates(results["after"], cfg.method.gates)
            distributed.log(f"[posttrain] after {steps} steps: {results['after']}")
            for name, g in results.get("gates", {}).items():
                distributed.log(f"[posttrain] {gate_line(name, g)}")
        final = save_final(model, cfg, tok, run_dir, adapters, dtype)
        if distributed.is_main():  # the model card carries eval.json's figures; eval.json itself comes last
            with open(os.path.join(run_dir, "lineage.json"), encoding="utf-8") as f:
                lineage.write_model_card(final, json.load(f), results)
            write_json(os.path.join(run_dir, "eval.json"), results)
            trackers.log_eval(results, steps)
    finally:
        trackers.close()
    distributed.log(f"[posttrain] done: {final}")
    return results
