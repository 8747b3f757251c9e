"""The optimisation loop every method shares.

Each step: the feed gives this step's micro-batches and the weight of each; each micro-batch goes
through `feed.loss_inputs` (the forward passes its kind needs), the method's loss, backward with
its weight; then clipping, AdamW, the schedule and a metrics.jsonl line. The loop knows no method
and no kind: everything kind-specific is a question to the feed (trainer/feeds/__init__.py).

Guards: a step whose loss or gradient norm is not finite is skipped (no update, so the weights and
every later checkpoint stay finite) and reported with its step and examples; more than
`skip_budget` skipped steps stop the run. Out of memory stops it with the batch shape and the knobs
to turn (on CPU, where it is a plain RuntimeError, too). Every `checkpoint_every` steps a crash-safe
checkpoint (trainer/checkpoint.py) is written; `resume` continues exactly where one was taken.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from losses import call_loss
from trainer import checkpoint, distributed


class OutOfMemory(RuntimeError):
    """Out of memory in a training step, with the batch shape and the knobs that lower memory."""


def lr_at(step: int, total: int, m, peak: float) -> float:
    """Linear warmup for warmup_ratio of the steps, then cosine decay to peak * min_lr_ratio."""
    warmup = max(1, int(m.warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (m.min_lr_ratio + (1 - m.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters: weight decay on matrices only; fused where it can be."""
    m = cfg.method
    params = [p for p in model.parameters() if p.requires_grad]
    lr = m.lr * (cfg.lora.lr_scale if cfg.lora.kind != "none" else 1.0)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": m.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and distributed.world_size() == 1  # sharded (DTensor) params: foreach
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(m.betas), fused=fused), params, lr


class MetricsLog:
    """metrics.jsonl: one JSON object per line, always with `step`; each line also goes to the
    run's experiment trackers (trainer/trackers.py), the one place they are fed during training.

    A resumed run keeps the lines of the steps before the checkpoint (`keep_below`) and drops the
    ones the killed run wrote after it, which the resumed run writes again.
    """

    def __init__(self, path: str, keep_below: int = 0, trackers=None):
        self.trackers = trackers
        kept = []
        if keep_below and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] < keep_below]
        self.f = open(path, "w" if keep_below else "a", encoding="utf-8")
        self.f.writelines(kept)

    def write(self, **row):
        row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in row.items()}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.trackers:
            self.trackers.log(row["step"], row)

    def close(self):
        self.f.close()


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                            or "not enough memory" in text)


def oom_message(step: int, i: int, shape: str, hints: list[str], cfg) -> str:
    knobs = hints + ["model.gradient_checkpointing=true" if not cfg.model.gradient_checkpointing else None,
                     f"data.max_length (now {cfg.data.max_length})",
                     "lora=lora or lora=qlora (no optimiser state for the base)"]
    return (f"out of memory at step {step}, micro-batch {i}: {shape}. Lower memory with: "
            + "; ".join(k for k in knobs if k))


def train_loop(model, ref, feed, cfg, run_dir: str, device, resume: str | None = None, before=None,
               evaluate=None, trackers=None) -> int:
    """Run the optimiser steps of `feed`; returns how many there were.

    `evaluate(model) -> metrics`, with `eval_every=N`, is run every N steps and logged as `eval/NAME`
    (training curves of held-out metrics; `elapsed_s` on every line is training time without it).
    `trackers`: rank 0's open experiment trackers, fed every metrics.jsonl line."""
    m = cfg.method
    total = feed.total_steps
    opt, params, lr = make_optimizer(model, cfg, device)
    start, skipped = 0, 0
    if resume is not None:
        state = checkpoint.load(resume, model, opt)
        if state["total"] != total:
            raise ValueError(f"{resume}: the checkpoint's run has {state['total']} steps, this config {total}; "
                             "resume with the same method settings")
        feed.load_state_dict(state["feed"])
        checkpoint.set_rng_state(state["rng"])
        start, skipped = state["step"], state["skipped"]
        distributed.log(f"[posttrain] resumed from {resume} at step {start} of {total}")
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), keep_below=start, trackers=trackers) \
        if distributed.is_main() else None
    world = distributed.world_size()
    # FSDP's mixed precision already computes in bf16 on CUDA; one process uses autocast instead
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and world == 1 \
        else contextlib.nullcontext()
    model.train()
    elapsed = 0.0
    bar = tqdm(range(start, total), desc=m.name, disable=not (cfg.progress and distributed.is_main()),
               initial=start, total=total, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, m, lr)
        batch = feed.next_step(model)
        sums, k = dict(batch.metrics), max(len(batch.micro_batches), 1)
        t0, ntok, loss_sum, bad_micro = time.perf_counter(), 0, 0.0, None
        for i, (micro, weight) in enumerate(zip(batch.micro_batches, batch.weights)):
            try:
                with autocast:
                    inputs, n, extra = feed.loss_inputs(model, ref, micro)
                    loss, metrics = call_loss(feed.loss_fn, inputs, m.loss_args)
                (loss * weight).backward()
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemory(oom_message(step, i, feed.describe(micro), feed.memory_hints(), cfg)) from None
            if bad_micro is None and not torch.isfinite(loss.detach()):
                bad_micro = i
            loss_sum += loss.item() * weight
            ntok += n
            for name, v in {**metrics, **extra}.items():
                if name != "loss":
                    sums[name] = sums.get(name, 0.0) + float(v) / k
        loss_sum = distributed.mean(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, m.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if math.isfinite(loss_sum) and torch.isfinite(grad_norm):
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_s = time.perf_counter() - t0
            tps = distributed.total(ntok) / train_s
            elapsed += train_s + sums.get("rollout_s", 0.0)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}",
                            **{k: f"{sums[k]:.3f}" for k in feed.progress_metrics if k in sums})
            if step % cfg.log_every == 0 or step == total - 1:
                if world > 1:  # every rank joins the reductions; rank 0 writes
                    sums = {name: distributed.mean(v) for name, v in sums.items()}
                if log:
                    log.write(step=step, loss=loss_sum, lr=opt.param_groups[0]["lr"], grad_norm=grad_norm,
                              tokens_per_s=tps, tokens=ntok, train_s=train_s, elapsed_s=elapsed, **sums)
        else:  # the step never reaches the weights
            opt.zero_grad(set_to_none=True)
            skipped += 1
            where = f"micro-batch {bad_micro}" if bad_micro is not None else "the gradient"
            report = (f"step {step}: non-finite loss ({loss_sum}) or gradient norm ({float(grad_norm)}) from {where}"
                      + (f", examples {batch.indices[bad_micro or 0]}" if batch.indices else "")
                      + f"; step skipped ({skipped} of skip_budget={cfg.skip_budget})")
            if distributed.is_main():  # every rank sees the same all-reduced loss: one report
                print(f"[posttrain] warning: {report}", file=sys.stderr)
            if log:
                log.write(step=step, skipped=skipped, skip_reason=report)
            if skipped > cfg.skip_budget:
                raise FloatingPointError(f"{report}: skip budget exhausted. Lower method.lr, check the data "
                                         "at those examples, or raise skip_budget")
        if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
            held_out = evaluate(model)
            model.train()
            if log:
                log.write(step=step, elapsed_s=elapsed, **{f"eval/{k}": v for k, v in held_out.items()})
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            state = {"step": step + 1, "total": total, "skipped": skipped, "feed": feed.state_dict(),
                     "rng": checkpoint.rng_state(), "before": before}
            checkpoint.save(os.path.join(run_dir, "checkpoints"), step + 1, model, opt, state,
                            keep=cfg.keep_checkpoints)
    if log:
        log.close()
    model.eval()
    return total
