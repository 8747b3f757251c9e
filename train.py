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

import contextlib
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
from data.formats import read_jsonl
from evaluate import Evaluator, check_gates, gate_line
from lora.inject import adapters_disabled, apply_adapters, export_merged
from lora.peft_io import save_adapter
from model.load import add_score_head, auto_device, load_model, resolve_dtype, save_model
from rollout.nash_md import NashMDSource, nash_md_loss_inputs
from rollout.rl import RolloutSource, rollout_loss_inputs

REPO = os.path.dirname(os.path.abspath(__file__))


def repo_path(path: str | None) -> str | None:
    """A path as given if it exists, else relative to the repository root (runs work from any cwd)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, m, peak: float) -> float:
    """Linear warmup for warmup_ratio of the steps, then cosine decay to peak * min_lr_ratio."""
    warmup = max(1, int(m.warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (m.min_lr_ratio + (1 - m.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    path = cfg.data.train or cfg.method.get("train_file") or cfg.data.files.get(cfg.method.data_format)
    if path is None:
        raise ValueError(f"no training file: set data.train=FILE (format '{cfg.method.data_format}')")
    return repo_path(path)


def eval_files(cfg) -> dict:
    """Held-out sets: the data config's, plus the method's `extra_eval`."""
    sets = {**(cfg.data.eval or {}), **(cfg.method.get("extra_eval") or {})}
    return {k: repo_path(v) for k, v in sets.items() if v}


def load_examples(cfg, tok) -> list[dict]:
    """The tokenized training set (read and validated whole before anything else happens)."""
    m = cfg.method
    examples = batches.load_examples(train_file(cfg), m.get("kind", "tokens"), m.data_format, tok, cfg.data.max_length)
    if m.get("pack"):
        examples = pack(examples, m.pack)
    return examples


class AdaptersDisabled:
    """The reference policy of an adapter run: the same model with every adapter switched off.

    Callable like the model (always without gradient); nothing is copied.
    """

    def __init__(self, policy):
        self.policy, self.model, self.config = policy, policy.model, policy.config

    @property
    def lm_head_weight(self):
        return self.policy.lm_head_weight

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy), torch.no_grad():
            return self.policy(*args, **kwargs)


def add_adapters(model, cfg) -> bool:
    """`lora=lora|dora|qlora`: wrap the target linears (freezing the rest). Returns whether it did."""
    a = cfg.lora
    if a.kind == "none":
        return False
    targets = a.targets if isinstance(a.targets, str) else list(a.targets)
    names = apply_adapters(model, kind=a.kind, rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=targets,
                           use_rslora=a.use_rslora, quantize=a.quantize)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[posttrain] {a.kind}{' (NF4 base)' if a.quantize else ''} adapters on {len(names)} linears: "
          f"{n_train:,} trainable parameters")
    return True


def make_reference(model, cfg, adapters: bool):
    """The frozen reference policy for methods with `reference: true`: the base with adapters
    disabled for adapter runs, a copy of the starting model for full fine-tuning."""
    if not cfg.method.get("reference"):
        return None
    if adapters:
        return AdaptersDisabled(model)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reward_accuracy(model, tok, cfg, device) -> dict:
    """Held-out pairwise accuracy of a reward model: share of pairs scored chosen > rejected."""
    path = repo_path(cfg.data.eval.get("preference"))
    if path is None:
        raise ValueError("method=reward needs a held-out preference set (data.eval.preference=FILE)")
    examples = batches.load_examples(path, "reward_pairs", "preference", tok, cfg.data.max_length)[:cfg.eval_max_examples]
    was_training = model.training
    model.eval()
    wins = []
    for i in range(0, len(examples), 32):
        inputs, _ = batches.loss_inputs("reward_pairs", model, None, examples[i:i + 32], tok, device)
        wins += (inputs["chosen_rewards"] > inputs["rejected_rewards"]).tolist()
    model.train(was_training)
    return {"preference_accuracy": round(sum(wins) / len(wins), 4)}


def train_loop(model, ref, tok, examples, cfg, run_dir, device):
    """The optimisation loop every method shares. Returns the number of optimiser steps taken.

    Each step: the source gives this step's micro-batches (a slice of the dataset, or a rollout
    batch for RL kinds); each micro-batch goes through the forward passes its kind needs, the
    method's loss, backward; then clipping, AdamW, the schedule, a metrics.jsonl line.
    """
    m = cfg.method
    kind = m.get("kind", "tokens")
    loss_fn = batches.resolve_loss(m.loss)
    loss_args = OmegaConf.to_container(m.loss_args, resolve=True) if m.get("loss_args") else {}
    if kind == "rollouts":
        source = RolloutSource(examples, tok, m, cfg.seed)
        total = m.max_steps
    elif kind == "nash_md":
        source, total = NashMDSource(examples, tok, m, cfg.seed, ref), m.max_steps
    else:
        source = batches.DatasetSource(examples, m.batch_size, m.grad_accum, cfg.seed)
        total = m.max_steps or math.ceil(len(examples) / (m.batch_size * m.grad_accum)) * m.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    lr = m.lr * (cfg.lora.lr_scale if cfg.lora.kind != "none" else 1.0)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": m.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(m.betas),
                            fused=device.type in ("cuda", "cpu"))
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()
    bar = tqdm(range(total), desc=m.name, disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, m, lr)
        micro_batches, sums = source.step(model)
        t0, ntok, loss_sum = time.perf_counter(), 0, 0.0
        # token-sum losses (dapo) are already normalised by the whole batch's token count
        scale = 1.0 if loss_args.get("loss_type") == "dapo" else 1.0 / max(len(micro_batches), 1)
        n_items = sum(float(r["mask"].sum()) for mb in micro_batches for r in mb) if kind == "rollouts" else None
        for micro in micro_batches:
            with autocast:
                if kind == "rollouts":
                    inputs, n, extra = rollout_loss_inputs(model, ref, micro, tok, device, m.temperature, n_items)
                elif kind == "nash_md":
                    inputs, n, extra = nash_md_loss_inputs(model, ref, micro, tok, device, m.temperature)
                else:
                    (inputs, n), extra = batches.loss_inputs(kind, model, ref, micro, tok, device), {}
                loss, metrics = batches.call_loss(loss_fn, inputs, loss_args)
            (loss * scale).backward()
            loss_sum += loss.item() * scale
            ntok += n
            for k, v in {**metrics, **extra}.items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v) / len(micro_batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, m.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {step}: non-finite gradient norm ({grad_norm}); loss {loss_sum}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        tps = ntok / train_s
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}",
                        **({"reward": f"{sums['reward']:.3f}"} if "reward" in sums else {}))
        if step % cfg.log_every == 0 or step == total - 1:
            log.write(step=step, loss=loss_sum, lr=opt.param_groups[0]["lr"], grad_norm=grad_norm,
                      tokens_per_s=tps, tokens=ntok, train_s=train_s, **sums)
    model.eval()
    return total


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # bad input or config: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    os.makedirs(run_dir, exist_ok=True)
    if cfg.pipeline.stages:
        from pipeline import run_pipeline

        common = [f"seed={cfg.seed}", f"device={cfg.device}", f"progress={cfg.progress}",
                  f"eval_max_examples={cfg.eval_max_examples}"]
        report = run_pipeline(OmegaConf.to_container(cfg.pipeline.stages, resolve=True), repo_path(cfg.model.path),
                              run_dir, common)
        if not report["passed"]:
            sys.exit(2)
        return report
    seed_everything(cfg.seed)
    device = auto_device() if cfg.device == "auto" else torch.device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype)
    if cfg.method.get("from_scratch"):
        model, tok = build_from_scratch(cfg, device, dtype)
    else:
        model, tok = load_model(repo_path(cfg.model.path), dtype=dtype, device=device)
    model.gradient_checkpointing = bool(cfg.model.gradient_checkpointing)
    adapters = add_adapters(model, cfg)
    print(f"[posttrain] {cfg.method.name} on {device} ({dtype}); run dir {run_dir}")
    if cfg.method.get("kind") in ("steer", "abliterate"):  # no training loop: steering/run.py evaluates and saves
        from steering.run import run_abliterate, run_steer

        evaluator = Evaluator(tok, eval_files(cfg), cfg.eval_max_examples)
        results = (run_steer if cfg.method.kind == "steer" else run_abliterate)(cfg, model, tok, run_dir, evaluator)
        with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        return results

    examples = load_examples(cfg, tok)
    if cfg.method.get("kind") == "reward_pairs" and not hasattr(model, "score"):
        add_score_head(model)
        torch.nn.init.normal_(model.score.weight, std=model.config.hidden_size ** -0.5)
        model.score.to(device=device, dtype=dtype)
    ref = make_reference(model, cfg, adapters)
    if ref is not None and cfg.method.get("precompute_ref"):
        batches.precompute_reference(ref, examples, cfg.method.kind, tok, device)
        ref = None  # the log-probs live in the examples now; the copy's memory is freed
    results = {}
    evaluator = Evaluator(tok, eval_files(cfg), cfg.eval_max_examples)
    if cfg.method.get("kind") == "reward_pairs":  # a reward model is judged on held-out pairs, not by generating
        evaluator = lambda model: reward_accuracy(model, tok, cfg, device)  # noqa: E731
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
                print(f"[posttrain] {gate_line(name, g)}")
    with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    final = os.path.join(run_dir, "checkpoints", "final")
    if adapters:  # a PEFT adapter directory (loads with peft.PeftModel.from_pretrained)
        save_adapter(model, final, base_model_name_or_path=str(cfg.model.path), tokenizer=tok)
        if cfg.lora.export_merged:
            export_merged(model, os.path.join(run_dir, "checkpoints", "merged"), tok)
    else:
        save_model(model, final, tok)
    if cfg.method.get("export"):
        export = repo_path(cfg.method.export)
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(final, export)
        print(f"[posttrain] exported to {export}")
    print(f"[posttrain] done: {final}")
    return results


if __name__ == "__main__":
    main()
