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
import checkpoint
import distributed
from data.formats import pack_examples, read_jsonl
from evaluation.metrics import Evaluator, check_gates, gate_line
from lora.inject import adapters_disabled, apply_adapters, export_merged
from lora.peft_io import save_adapter
from model.load import add_score_head, auto_device, load_model, resolve_dtype, save_model
from rollout.nash_md import NashMDSource, nash_md_loss_inputs
from rollout.pairs import sample_pairs
from rollout.rewards import get_rewards
from rollout.rl import RolloutSource, micro_batch_shares, rollout_loss_inputs
from rollout.sampler import SamplingConfig

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
    """metrics.jsonl: one JSON object per line, always with `step`.

    A resumed run keeps the lines of the steps before the checkpoint (`keep_below`) and drops the
    ones the killed run wrote after it, which the resumed run writes again.
    """

    def __init__(self, path: str, keep_below: int = 0):
        kept = []
        if keep_below and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] < keep_below]
        self.f = open(path, "w" if keep_below else "a", encoding="utf-8")
        self.f.writelines(kept)

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


def on_policy_file(cfg, tok, model, run_dir: str) -> str:
    """`method.on_policy`: preference pairs from the starting model's own samples (rollout/pairs.py),
    plus the training file's rows whose `task` is in `keep_tasks`, written to
    run_dir/on_policy_pairs.jsonl (the file the run then trains on, checked like any other)."""
    o, m = cfg.method.on_policy, cfg.method
    rows = read_jsonl(repo_path(o.prompts), "prompt")
    sampling = SamplingConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature)
    pairs, stats = sample_pairs(model, tok, rows, get_rewards([o.reward])[0], samples=o.samples, sampling=sampling,
                                seed=cfg.seed, pairs_per_prompt=o.pairs_per_prompt, progress=bool(cfg.progress))
    keep = set(o.get("keep_tasks") or [])
    kept = [r for r in read_jsonl(train_file(cfg), m.data_format) if r.get("task") in keep] if keep else []
    if not pairs and not kept:
        raise ValueError(f"method.on_policy: no pairs from {o.prompts} (every prompt's {o.samples} samples agreed: "
                         f"{stats}) and no kept rows; raise temperature or samples")
    path = os.path.join(run_dir, "on_policy_pairs.jsonl")
    if distributed.is_main():
        print(f"[posttrain] on-policy pairs: {stats['pairs']} from {stats['prompts']} prompts x {o.samples} samples "
              f"(samples right {stats['sample_accuracy']:.0%}, all right {stats['all_right']:.0%}, all wrong "
              f"{stats['all_wrong']:.0%}) + {len(kept)} rows of tasks {sorted(keep)} -> {path}")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in pairs + kept)
    distributed.barrier()
    return path


def load_examples(cfg, tok, model=None, run_dir: str | None = None) -> list[dict]:
    """The tokenized training set (read and validated whole before anything else happens)."""
    m = cfg.method
    path = on_policy_file(cfg, tok, model, run_dir) if m.get("on_policy") else train_file(cfg)
    examples = batches.load_examples(path, m.get("kind", "tokens"), m.data_format, tok, cfg.data.max_length)
    if m.get("pack"):
        examples = pack(examples, m.pack)
    elif m.get("packing"):  # padding-free SFT: whole examples packed into rows, attention kept per example
        n = len(examples)
        examples = pack_examples(examples, cfg.data.max_length)
        print(f"[posttrain] packed {n} examples into {len(examples)} rows of up to {cfg.data.max_length} tokens")
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


def add_adapters(model, cfg, verbose: bool = True) -> bool:
    """`lora=lora|dora|qlora`: wrap the target linears (freezing the rest). Returns whether it did."""
    a = cfg.lora
    if a.kind == "none":
        return False
    targets = a.targets if isinstance(a.targets, str) else list(a.targets)
    names = apply_adapters(model, kind=a.kind, rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=targets,
                           use_rslora=a.use_rslora, quantize=a.quantize)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose and distributed.is_main():
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


class OutOfMemory(RuntimeError):
    """Out of memory in a training step, with the batch shape and the knobs that lower memory."""


def batch_shape(micro: list[dict]) -> str:
    """`rows x longest sequence` of a micro-batch of examples or rollout rows."""
    lengths = [len(v["input_ids"]) for ex in micro for v in ([ex] if "input_ids" in ex else ex.values())
               if isinstance(v, dict) and "input_ids" in v] or [len(r["seq"]) for r in micro if "seq" in r]
    return f"{len(lengths) or len(micro)} sequences x {max(lengths, default=0)} tokens"


def oom_message(step: int, i: int, micro: list[dict], cfg) -> str:
    m = cfg.method
    knobs = [f"method.batch_size={max(1, m.get('batch_size', 2) // 2)} method.grad_accum={2 * m.get('grad_accum', 1)} "
             "(same global batch, half the activations)" if m.get("kind", "tokens") not in ("rollouts", "nash_md") else
             f"method.micro_batch_size={max(1, m.get('micro_batch_size', 2) // 2)} (rollout rows per forward)",
             "model.gradient_checkpointing=true" if not cfg.model.gradient_checkpointing else None,
             f"data.max_length (now {cfg.data.max_length})", "lora=lora or lora=qlora (no optimiser state for the base)"]
    return (f"out of memory at step {step}, micro-batch {i}: {batch_shape(micro)}. Lower memory with: "
            + "; ".join(k for k in knobs if k))


def make_source(kind: str, examples, tok, cfg, ref):
    """The data source of a method's kind and the number of optimiser steps it makes."""
    m, rank, world = cfg.method, distributed.rank(), distributed.world_size()
    if kind == "rollouts":
        return RolloutSource(examples, tok, m, cfg.seed, rank=rank, world=world), m.max_steps
    if kind == "nash_md":
        return NashMDSource(examples, tok, m, cfg.seed, ref, rank=rank, world=world), m.max_steps
    source = batches.DatasetSource(examples, m.batch_size, m.grad_accum, cfg.seed, rank, world)
    return source, m.max_steps or math.ceil(len(examples) / (m.batch_size * m.grad_accum * world)) * m.epochs


def make_optimizer(model, cfg, device):
    m = cfg.method
    params = [p for p in model.parameters() if p.requires_grad]
    lr = m.lr * (cfg.lora.lr_scale if cfg.lora.kind != "none" else 1.0)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": m.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and distributed.world_size() == 1  # sharded (DTensor) params: foreach
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(m.betas), fused=fused), params, lr


def train_loop(model, ref, tok, examples, cfg, run_dir, device, resume: str | None = None, before=None):
    """The optimisation loop every method shares. Returns the number of optimiser steps taken.

    Each step: the source gives this step's micro-batches (a slice of the dataset, or a rollout
    batch for RL kinds); each micro-batch goes through the forward passes its kind needs, the
    method's loss, backward; then clipping, AdamW, the schedule, a metrics.jsonl line.

    Guards: a step whose loss or gradient norm is not finite is skipped (no update, so the weights
    and every later checkpoint stay finite) and reported with its step and batch; more than
    `skip_budget` skipped steps stop the run. Out of memory stops it with the batch shape and the
    knobs to turn. Every `checkpoint_every` steps a crash-safe checkpoint (checkpoint.py) is
    written; `resume` (a checkpoint directory) continues exactly where that checkpoint was taken.
    """
    m = cfg.method
    kind = m.get("kind", "tokens")
    loss_fn = batches.resolve_loss(m.loss)
    loss_args = OmegaConf.to_container(m.loss_args, resolve=True) if m.get("loss_args") else {}
    completion_cap = loss_args.pop("max_completion_length", m.get("max_new_tokens"))  # dr_grpo's normaliser
    source, total = make_source(kind, examples, tok, cfg, ref)
    if (cfg.checkpoint_every or resume) and not hasattr(source, "state_dict"):
        raise NotImplementedError(f"checkpoint_every/resume: the {kind} source has no state_dict() to save its position")
    opt, params, lr = make_optimizer(model, cfg, device)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    start, skipped = 0, 0
    if resume is not None:
        state = checkpoint.load(resume, model, opt)
        if state["total"] != total:
            raise ValueError(f"{resume}: the checkpoint's run has {state['total']} steps, this config {total}; "
                             "resume with the same method settings")
        source.load_state_dict(state["source"])
        checkpoint.set_rng_state(state["rng"])
        start, skipped = state["step"], state["skipped"]
        print(f"[posttrain] resumed from {resume} at step {start} of {total}")
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), keep_below=start) if distributed.is_main() else None
    # FSDP's mixed precision already computes in bf16 on CUDA; one process uses autocast instead
    world = distributed.world_size()
    bf16 = device.type == "cuda" and world == 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model.train()
    bar = tqdm(range(start, total), desc=m.name, disable=not (cfg.progress and distributed.is_main()),
               initial=start, total=total, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, m, lr)
        micro_batches, sums = source.step(model)
        t0, ntok, loss_sum, bad_micro = time.perf_counter(), 0, 0.0, None
        # token-sum losses (dapo) are already normalised by the whole batch's token count, over all
        # ranks; FSDP averages gradients over ranks, so they are scaled back up by the world size
        if loss_args.get("loss_type") == "dapo":
            scales = [world] * len(micro_batches)
        elif kind in ("rollouts", "nash_md"):  # micro-batches may differ in size: each counts by its share
            scales = micro_batch_shares(micro_batches, loss_args.get("loss_type", "grpo"))
        else:
            scales = [1.0 / len(micro_batches)] * len(micro_batches)
        n_items = distributed.total(sum(float(r["mask"].sum()) for mb in micro_batches for r in mb)) \
            if kind == "rollouts" else None
        for i, (micro, scale) in enumerate(zip(micro_batches, scales)):
            try:
                with autocast:
                    if kind == "rollouts":
                        inputs, n, extra = rollout_loss_inputs(model, ref, micro, tok, device, m.temperature, n_items,
                                                               completion_cap)
                    elif kind == "nash_md":
                        inputs, n, extra = nash_md_loss_inputs(model, ref, micro, tok, device, m.temperature)
                    else:
                        (inputs, n), extra = batches.loss_inputs(kind, model, ref, micro, tok, device,
                                                                 m.get("padding_free", True)), {}
                    loss, metrics = batches.call_loss(loss_fn, inputs, loss_args)
                (loss * scale).backward()
            except torch.OutOfMemoryError as e:
                raise OutOfMemory(oom_message(step, i, micro, cfg)) from e
            if bad_micro is None and not torch.isfinite(loss.detach()):
                bad_micro = i
            loss_sum += loss.item() * scale
            ntok += n
            for k, v in {**metrics, **extra}.items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v) / len(micro_batches)
        loss_sum = distributed.mean(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, m.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if math.isfinite(loss_sum) and torch.isfinite(grad_norm):
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_s = time.perf_counter() - t0
            tps = distributed.total(ntok) / train_s
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}",
                            **({"reward": f"{sums['reward']:.3f}"} if "reward" in sums else {}))
            if step % cfg.log_every == 0 or step == total - 1:
                if world > 1:  # every rank joins the reductions; rank 0 writes
                    sums = {k: distributed.mean(v) for k, v in sums.items()}
                if log:
                    log.write(step=step, loss=loss_sum, lr=opt.param_groups[0]["lr"], grad_norm=grad_norm,
                              tokens_per_s=tps, tokens=ntok, train_s=train_s, **sums)
        else:  # the step never reaches the weights
            opt.zero_grad(set_to_none=True)
            skipped += 1
            where = f"micro-batch {bad_micro}" if bad_micro is not None else "the gradient"
            indices = getattr(source, "last_indices", None)
            report = (f"step {step}: non-finite loss ({loss_sum}) or gradient norm ({float(grad_norm)}) from {where}"
                      + (f", examples {indices[bad_micro or 0]}" if indices else "")
                      + f"; step skipped ({skipped} of skip_budget={cfg.skip_budget})")
            print(f"[posttrain] warning: {report}", file=sys.stderr)
            if log:
                log.write(step=step, skipped=skipped, skip_reason=report)
            if skipped > cfg.skip_budget:
                raise FloatingPointError(f"{report}: skip budget exhausted. Lower method.lr, check the data "
                                         "at those examples, or raise skip_budget")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            state = {"step": step + 1, "total": total, "skipped": skipped, "source": source.state_dict(),
                     "rng": checkpoint.rng_state(), "before": before}
            checkpoint.save(ckpt_root, step + 1, model, opt, state, keep=cfg.keep_checkpoints)
    model.eval()
    return total


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError, NotImplementedError, OutOfMemory, FloatingPointError) as e:  # clear message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.close()


def resume_checkpoint(cfg, run_dir: str) -> str | None:
    """`resume=true`: the newest checkpoint of this run directory; `resume=DIR`: of DIR (a run
    directory or a checkpoint). A resumed run in a new directory starts with the old metrics lines."""
    if cfg.resume in (None, False, "false"):
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


def save_final(model, cfg, tok, run_dir: str, adapters: bool, dtype) -> str:
    """checkpoints/final: a HF model directory, or a PEFT adapter directory for adapter runs.
    Distributed: every rank gathers the full state to rank 0, which writes it from a fresh copy."""
    final = os.path.join(run_dir, "checkpoints", "final")
    if distributed.world_size() > 1:
        state = distributed.full_state_dict(model)
        if not distributed.is_main():
            return final
        model, _ = load_model(repo_path(cfg.model.path), dtype=dtype, device="cpu", with_tokenizer=False)
        add_adapters(model, cfg, verbose=False)
        model.load_state_dict(state, strict=False)
    if adapters:  # loads with peft.PeftModel.from_pretrained
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
    return final


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
    dist_device = distributed.init(cfg.device)  # torchrun with WORLD_SIZE > 1: FSDP2 data parallelism
    world = distributed.world_size()
    device = dist_device or (auto_device() if cfg.device == "auto" else torch.device(cfg.device))
    dtype = resolve_dtype(cfg.model.dtype)
    if world > 1 and dtype != torch.float32:
        dtype = torch.float32  # FSDP keeps fp32 master weights and computes in bf16 (MixedPrecisionPolicy)
    if cfg.method.get("from_scratch"):
        model, tok = build_from_scratch(cfg, device, dtype)
    else:
        model, tok = load_model(repo_path(cfg.model.path), dtype=dtype, device=device)
    model.gradient_checkpointing = bool(cfg.model.gradient_checkpointing)
    adapters = add_adapters(model, cfg)
    if distributed.is_main():
        print(f"[posttrain] {cfg.method.name} on {device} ({dtype}){f' x {world} processes' if world > 1 else ''}; "
              f"run dir {run_dir}")
    if cfg.method.get("kind") in ("steer", "abliterate"):  # no training loop: steering/run.py evaluates and saves
        if world > 1:
            raise NotImplementedError("steering and abliteration run in one process (no torchrun)")
        from steering.run import run_abliterate, run_steer

        evaluator = Evaluator(tok, eval_files(cfg), cfg.eval_max_examples)
        results = (run_steer if cfg.method.kind == "steer" else run_abliterate)(cfg, model, tok, run_dir, evaluator)
        with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        return results

    examples = load_examples(cfg, tok, model, run_dir)
    if cfg.method.get("kind") == "reward_pairs" and not hasattr(model, "score"):
        add_score_head(model)
        torch.nn.init.normal_(model.score.weight, std=model.config.hidden_size ** -0.5)
        model.score.to(device=device, dtype=dtype)
    ref = make_reference(model, cfg, adapters)
    if ref is not None and cfg.method.get("precompute_ref"):
        batches.precompute_reference(ref, examples, cfg.method.kind, tok, device)
        ref = None  # the log-probs live in the examples now; the copy's memory is freed
    if world > 1:
        distributed.shard(model, mixed_precision=device.type == "cuda")
        if ref is not None and not isinstance(ref, AdaptersDisabled):  # the frozen copy: 1/N per rank, not N copies
            distributed.shard(ref, mixed_precision=device.type == "cuda")
            if distributed.is_main():
                print(f"[posttrain] frozen reference sharded over {world} processes")
    if cfg.model.get("compile"):  # regional: each block compiled once and reused by every layer's call
        for layer in model.model.layers:
            layer.compile(dynamic=True)
        print(f"[posttrain] torch.compile: {len(model.model.layers)} transformer blocks (compiled on first use)")
    resume = resume_checkpoint(cfg, run_dir)
    results = {}
    evaluator = Evaluator(tok, eval_files(cfg), cfg.eval_max_examples)
    if cfg.method.get("kind") == "reward_pairs":  # a reward model is judged on held-out pairs, not by generating
        evaluator = lambda model: reward_accuracy(model, tok, cfg, device)  # noqa: E731
    before = checkpoint.trainer_state(resume).get("before") if resume else None
    if before is not None:
        results["before"] = before  # measured on the same start by the first run
    elif cfg.eval_before:
        results["before"] = evaluator(model)
        if distributed.is_main():
            print(f"[posttrain] before: {results['before']}")
    steps = train_loop(model, ref, tok, examples, cfg, run_dir, device, resume=resume, before=results.get("before"))
    if cfg.eval_after:
        results["after"] = evaluator(model)
        if cfg.method.get("gates"):
            results["gates"] = check_gates(results["after"], OmegaConf.to_container(cfg.method.gates))
        if distributed.is_main():
            print(f"[posttrain] after {steps} steps: {results['after']}")
            for name, g in results.get("gates", {}).items():
                print(f"[posttrain] {gate_line(name, g)}")
    if distributed.is_main():
        with open(os.path.join(run_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    final = save_final(model, cfg, tok, run_dir, adapters, dtype)
    if distributed.is_main():
        print(f"[posttrain] done: {final}")
    return results


if __name__ == "__main__":
    main()
