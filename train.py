"""One entry point for every method: `python train.py method=sft model=tiny data=synthetic`.

The run is always the same five steps, whatever the method:
  1. load the model and tokenizer (`model.path`: the embedded model, any HF directory or hub id;
     `method=pretrain` builds a fresh tokenizer and model instead),
  2. evaluate it on the held-out sets (eval.json "before"),
  3. train: AdamW, linear warmup + cosine decay, gradient clipping and accumulation, bf16 autocast
     on CUDA, a progress bar with loss and tokens/s, one metrics.jsonl line per step,
  4. evaluate again (eval.json "after"),
  5. save a Hugging Face directory to checkpoints/final.
Everything lands in the Hydra run directory (`hydra.run.dir=DIR` to choose it). The method's loss
lives in losses/<name>.py; its hyper-parameters in configs/method/<name>.yaml.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import batches
from data.formats import DataError, read_jsonl
from evaluate import Evaluator, check_gates
from model.load import auto_device, load_model, resolve_dtype, save_model

REPO = os.path.dirname(os.path.abspath(__file__))


def repo_path(path: str | None) -> str | None:
    """A path as given if it exists, else relative to the repository root (runs work from any cwd)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, m) -> float:
    """Linear warmup for warmup_ratio of the steps, then cosine decay to lr * min_lr_ratio."""
    warmup = max(1, int(m.warmup_ratio * total))
    if step < warmup:
        return m.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return m.lr * (m.min_lr_ratio + (1 - m.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate tokenized examples and cut them into blocks of `block` tokens (no padding).

    Used for pretraining on plain text: documents are separated by their own end tokens, and
    attention crosses document boundaries, as in GPT-style pretraining. The tail is dropped.
    """
    ids = [i for ex in examples for i in ex["input_ids"]]
    return [{"input_ids": ids[i:i + block], "loss_mask": [1] * block, "truncated": False}
            for i in range(0, len(ids) - block + 1, block)]


class MetricsLog:
    """metrics.jsonl: one JSON object per line, always with `step`."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, **row):
        self.f.write(json.dumps({k: (v.item() if torch.is_tensor(v) else v) for k, v in row.items()}) + "\n")
        self.f.flush()


def build_from_scratch(cfg, device, dtype):
    """method=pretrain: a BPE tokenizer trained on the corpus and a freshly initialised model."""
    from model.config import ModelConfig
    from model.train_tokenizer import train_tokenizer
    from model.transformer import Transformer

    m = cfg.method
    texts = [ex["text"] for ex in read_jsonl(train_file(cfg), "text")]
    tok = train_tokenizer(texts, vocab_size=m.tokenizer_vocab_size)
    arch = OmegaConf.to_container(m.arch, resolve=True)
    config = ModelConfig(**arch, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(cfg.seed)
    model = Transformer(config)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=m.init_std)
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # GPT-2 style residual scaling
                p.data /= math.sqrt(2 * config.num_hidden_layers)
    return model.to(device=device, dtype=dtype), tok


def train_file(cfg) -> str:
    path = cfg.data.train or cfg.data.files.get(cfg.method.data_format)
    if path is None:
        raise ValueError(f"no training file: set data.train=FILE (format '{cfg.method.data_format}')")
    return repo_path(path)


def eval_files(cfg) -> dict:
    return {k: repo_path(v) for k, v in (cfg.data.eval or {}).items() if v}


def load_examples(cfg, tok) -> list[dict]:
    """The tokenized training set (read and validated whole before anything else happens)."""
    m = cfg.method
    examples = batches.load_examples(train_file(cfg), m.get("kind", "tokens"), m.data_format, tok, cfg.data.max_length)
    if m.get("pack"):
        examples = pack(examples, m.pack)
    return examples


def make_reference(model, cfg):
    """The frozen reference policy for methods with `reference: true`: a copy of the starting model.

    (With adapters the reference will be the base with adapters disabled: no copy.)
    """
    if not cfg.method.get("reference"):
        return None
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def train_loop(model, ref, tok, examples, cfg, run_dir, device):
    """The optimisation loop every method shares. Returns the number of optimiser steps taken.

    Each micro-batch: batches.loss_inputs (the forward passes the batch kind needs) -> the method's
    loss -> backward. Then clipping, AdamW, the schedule, a metrics.jsonl line.
    """
    m = cfg.method
    kind = m.get("kind", "tokens")
    loss_fn = batches.resolve_loss(m.loss)
    loss_args = OmegaConf.to_container(m.loss_args, resolve=True) if m.get("loss_args") else {}
    steps_per_epoch = math.ceil(len(examples) / (m.batch_size * m.grad_accum))
    total = m.max_steps or steps_per_epoch * m.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": m.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=m.lr, betas=tuple(m.betas),
                            fused=device.type == "cuda")
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(examples), generator=gen).tolist(), 0
    model.train()
    bar = tqdm(range(total), desc=m.name, disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        t0, ntok, loss_sum, sums = time.perf_counter(), 0, 0.0, {}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, m)
        for _ in range(m.grad_accum):
            if cursor + m.batch_size > len(order):
                order, cursor = torch.randperm(len(examples), generator=gen).tolist(), 0
            micro = [examples[i] for i in order[cursor:cursor + m.batch_size]]
            cursor += m.batch_size
            with autocast:
                inputs, n = batches.loss_inputs(kind, model, ref, micro, tok, device)
                loss, metrics = batches.call_loss(loss_fn, inputs, loss_args)
            (loss / m.grad_accum).backward()
            loss_sum += loss.item() / m.grad_accum
            ntok += n
            for k, v in metrics.items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v) / m.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, m.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {step}: non-finite gradient norm ({grad_norm}); loss {loss_sum}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        tps = ntok / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}")
        if step % cfg.log_every == 0 or step == total - 1:
            log.write(step=step, loss=loss_sum, lr=opt.param_groups[0]["lr"], grad_norm=grad_norm,
                      tokens_per_s=tps, tokens=ntok, **sums)
    model.eval()
    return total


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return run(cfg)
    except (DataError, FileNotFoundError, NotImplementedError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    os.makedirs(run_dir, exist_ok=True)
    seed_everything(cfg.seed)
    device = auto_device() if cfg.device == "auto" else torch.device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype)
    if cfg.method.get("from_scratch"):
        model, tok = build_from_scratch(cfg, device, dtype)
    else:
        model, tok = load_model(repo_path(cfg.model.path), dtype=dtype, device=device)
    model.gradient_checkpointing = bool(cfg.model.gradient_checkpointing)
    # Training keeps fp32 master weights unless the model was asked for in bf16 explicitly.
    print(f"[posttrain] {cfg.method.name} on {device} ({dtype}); run dir {run_dir}")

    examples = load_examples(cfg, tok)
    ref = make_reference(model, cfg)
    if ref is not None and cfg.method.get("precompute_ref"):
        batches.precompute_reference(ref, examples, cfg.method.kind, tok, device)
        ref = None  # the log-probs live in the examples now; the copy's memory is freed
    results = {}
    evaluator = Evaluator(tok, eval_files(cfg), cfg.eval_max_examples)
    if cfg.eval_before:
        results["before"] = evaluator(model)
        print(f"[posttrain] before: {results['before']}")
    steps = train_loop(model, ref, tok, examples, cfg, run_dir, device)
    if cfg.eval_after:
        results["after"] = evaluator(model)
        print(f"[posttrain] after {steps} steps: {results['after']}")
        if cfg.method.get("gates"):
            results["gates"] = check_gates(results["after"], OmegaConf.to_container(cfg.method.gates))
            for name, g in results["gates"].items():
                print(f"[posttrain] gate {name}: {g['value']} ({'<=' if 'max' in g else '>='} {g['threshold']}) "
                      f"{'PASS' if g['pass'] else 'FAIL'}")
    with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    final = save_model(model, os.path.join(run_dir, "checkpoints", "final"), tok)
    if cfg.method.get("export"):
        export = repo_path(cfg.method.export) if not os.path.isabs(cfg.method.export) else cfg.method.export
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(final, export)
        print(f"[posttrain] exported to {export}")
    print(f"[posttrain] done: {final}")
    return results


if __name__ == "__main__":
    main()
