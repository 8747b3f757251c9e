"""GRPO step time: posttrain vs TRL's GRPOTrainer (no vLLM), same model, prompts, reward and settings, in one run.

    python benchmarks/bench_grpo.py [--steps N] [--warmup N] [--prompts 8] [--generations 8]
                                    [--max-new-tokens 16] [--grad-checkpointing] [--model DIR]
                                    [--device cpu|cuda] [--threads 1] [--json F]

Same model (`assets/tiny-qwen3` by default; ours: model.load.load_model, TRL:
AutoModelForCausalLM.from_pretrained), same prompts (data/synthetic/grpo_train.jsonl in file order
on both sides, through the chat template with the generation prompt: TRL gets conversational
prompts [{"role": "user", "content": ...}]), same reward (rollout/rewards.py `math_answer`, wrapped
as a TRL reward function), same settings: 8 prompts x 8 generations = 64 completions per optimiser
step, at most 16 new tokens, temperature 1, no top-k/top-p, beta 0 (no reference model),
num_iterations 1, loss_type "grpo", group-scaled advantages, clip eps 0.2, AdamW, grad clipping 1.0,
fp32, no activation checkpointing (TRL's GRPOConfig turns it on by default: turned off here, as ours
is; `--grad-checkpointing` turns it on for both). TRL: per_device_train_batch_size =
generation_batch_size = 64, num_generations 8 (one generation per step, no gradient accumulation).

Ours, one step, as trainer/loop.py does it: RolloutFeed.next_step (the KV-cached sampler, rewards,
group advantages) -> RolloutFeed.loss_inputs -> losses.grpo.grpo_loss -> backward -> clip -> AdamW,
with the loss and metric reads train.py does. Rollout and training are timed separately.
TRL: a TrainerCallback times on_step_begin -> on_step_end of each step (generation happens inside
it, in training_step -> _prepare_inputs); TRL's rollout share is timed by wrapping its
`_generate_and_score_completions` (generation, decoding, rewards, advantages), the rest is its
training share. Our step runs inside on_step_end right after each TRL step, so the two alternate
step by step and share the machine's noise. Wall clock and process CPU time are both recorded (CPU
time leaves out the time other jobs held the cores). The first `--warmup` steps of each side are
dropped; medians (minima in brackets). Ratio = TRL / ours (> 1: ours is faster). Target: >= 2.0.
Completion lengths are sampled, so they differ between the sides: the mean length of each is
printed next to its time. transformers and trl are imported here only; the product never imports them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

from losses import call_loss  # noqa: E402
from losses.grpo import grpo_loss  # noqa: E402
from model.load import load_model  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from tasks.arithmetic import math_answer  # noqa: E402
from trainer.config import compose  # noqa: E402
from trainer.feeds import get_feed  # noqa: E402
from trainer.paths import REPO  # noqa: E402

TINY = os.path.join(REPO, "assets", "tiny-qwen3")
DATA = os.path.join(REPO, "data", "synthetic", "grpo_train.jsonl")
LR, BETAS, CLIP = 1e-5, (0.9, 0.99), 1.0
TARGET = 2.0


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time leaves out the time other jobs held the
    cores: on a shared machine it is the steadier figure (single-threaded, it is the work done)."""
    return time.perf_counter(), time.process_time()


def diff(a, b) -> tuple[float, float]:
    return b[0] - a[0], b[1] - a[1]


def scratch_dir() -> str:
    """TRL's output_dir (it saves nothing here: save_strategy="no"), removed at exit."""
    import atexit
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="bench_trl_")
    atexit.register(shutil.rmtree, d, True)
    return d


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def med(xs):
    return statistics.median(xs)


# --------------------------------------------------------------------------------------------- ours
class Ours:
    """posttrain's GRPO: the method config, the rollout source, the optimiser, and one step as train.py takes it."""

    def __init__(self, args, device):
        self.device = device
        has_tok = os.path.isfile(os.path.join(args.model, "tokenizer.json"))
        self.model, self.tok = load_model(args.model, dtype=torch.float32, device=device, with_tokenizer=has_tok)
        if not has_tok:
            self.tok = Tokenizer.from_dir(TINY)
        self.model.gradient_checkpointing = args.grad_checkpointing
        cfg = compose(["method=grpo", f"data.train={DATA}", "data.max_length=4096", "method.reward=[math_answer]",
                       "method.reward_weights=[1.0]", f"method.num_generations={args.generations}",
                       f"method.prompts_per_step={args.prompts}",
                       f"method.micro_batch_size={args.prompts * args.generations}",
                       f"method.max_new_tokens={args.max_new_tokens}", "method.temperature=1.0", f"method.lr={LR}",
                       f"method.betas=[{BETAS[0]},{BETAS[1]}]", "+method.loss_args.loss_type=grpo"])
        self.m = cfg.method
        self.feed = get_feed(self.m.kind)(cfg, self.tok, device)
        self.feed.load(self.model, run_dir=".")
        self.feed.order = list(range(len(self.feed.rows)))  # file order, as TRL's unshuffled sampler (benchmark only)
        self.loss_args = dict(self.m.loss_args)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, weight_decay=0.0, fused=device.type in ("cuda", "cpu"))
        self.model.train()

    def step(self) -> dict:
        """One optimiser step; returns its rollout and training seconds and rollout metrics."""
        sync(self.device)
        t0 = clock()
        batch = self.feed.next_step(self.model)
        micro_batches, sums = batch.micro_batches, batch.metrics
        sync(self.device)
        t1 = clock()
        for micro, weight in zip(micro_batches, batch.weights):
            inputs, n, extra = self.feed.loss_inputs(self.model, None, micro)
            loss, metrics = call_loss(grpo_loss, inputs, self.loss_args)
            (loss * weight).backward()
            loss.item()
            for k, v in {**metrics, **extra}.items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v) / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        t2 = clock()
        (r, rc), (tr, trc), (tt, ttc) = diff(t0, t1), diff(t1, t2), diff(t0, t2)
        return {"rollout": r, "train": tr, "total": tt, "rollout_cpu": rc, "train_cpu": trc, "total_cpu": ttc,
                "length": sums["completion_length/mean"], "reward": sums["reward"]}


# ------------------------------------------------------------------------------------------- theirs
def trl_math_answer(prompts, completions, answer, **kwargs):
    """rollout/rewards.py math_answer on TRL's conversational completions."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return math_answer(None, texts, answer=answer)


def trl_trainer(args, device, max_steps: int, callbacks):
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)

    tok_dir = args.model if os.path.isfile(os.path.join(args.model, "tokenizer.json")) else TINY
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(line) for line in open(DATA, encoding="utf-8") if line.strip()]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                       for r in rows])
    n = args.prompts * args.generations
    cfg = GRPOConfig(output_dir=scratch_dir(), per_device_train_batch_size=n,
                     generation_batch_size=n, num_generations=args.generations, gradient_accumulation_steps=1,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                     num_iterations=1, loss_type="grpo", scale_rewards="group", epsilon=0.2, learning_rate=LR,
                     adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, max_grad_norm=CLIP,
                     max_steps=max_steps, shuffle_dataset=False, bf16=False, fp16=False,
                     use_cpu=device.type == "cpu", report_to="none", save_strategy="no", logging_steps=10_000,
                     disable_tqdm=True, dataloader_pin_memory=False, seed=0,
                     gradient_checkpointing=args.grad_checkpointing)  # TRL's default is True; ours off: same both sides
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_math_answer], args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=callbacks)
    trainer.remove_callback(transformers.PrinterCallback)  # no end-of-training log dict on stdout
    return trainer


# ------------------------------------------------------------------------------------------ bench
def bench(args, device) -> dict:
    from transformers import TrainerCallback

    ours = Ours(args, device)
    res = {"ours": [], "theirs": []}
    w = args.warmup
    rollout_t, lengths, rewards = [], [], []

    class Interleave(TrainerCallback):
        """TRL step k (timed on_step_begin -> on_step_end), then our step k."""

        def on_step_begin(self, a, state, control, **kw):
            sync(device)
            rollout_t.clear()
            self.t_begin = clock()

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            tt, ttc = diff(self.t_begin, clock())
            r, rc = (sum(x[i] for x in rollout_t) for i in (0, 1))
            res["theirs"].append({"rollout": r, "train": tt - r, "total": tt,
                                  "rollout_cpu": rc, "train_cpu": ttc - rc, "total_cpu": ttc})
            res["ours"].append(ours.step())

    trainer = trl_trainer(args, device, w + args.steps, [Interleave()])
    inner = trainer._generate_and_score_completions

    def timed_rollout(*a, **k):
        sync(device)
        t = clock()
        out = inner(*a, **k)
        sync(device)
        rollout_t.append(diff(t, clock()))
        lengths.append(out["completion_mask"].sum(1).float().mean().item())
        rewards.append(trainer._metrics["train"]["reward"][-1])
        return out

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    out = {side: {k: [s[k] for s in steps[w:]] for k in steps[0]} for side, steps in res.items()}
    out["theirs"]["length"], out["theirs"]["reward"] = lengths[w:], rewards[w:]
    return out


def report(r: dict, args, device) -> bool:
    o, t = r["ours"], r["theirs"]
    n = args.prompts * args.generations
    print(f"\nGRPO step ({device.type}; {args.prompts} prompts x {args.generations} generations = {n} completions, "
          f"<= {args.max_new_tokens} new tokens), medians over {len(o['total'])} steps [minima], ms")
    for suffix, title in (("", "wall clock"), ("_cpu", "process CPU time")):
        print(f"  {title}:")
        print(f"  {'':8s}{'step':>16s}{'rollout':>16s}{'train':>16s}{'rollout share':>15s}"
              + (f"{'mean length':>13s}{'reward':>8s}" if not suffix else ""))
        for name, x in (("ours", o), ("TRL", t)):
            extra = f"{statistics.mean(x['length']):13.1f}{statistics.mean(x['reward']):8.3f}" if not suffix else ""
            print(f"  {name:8s}" + "".join(f"{med(x[k + suffix]) * 1e3:9.1f} [{min(x[k + suffix]) * 1e3:5.0f}]"
                                           for k in ("total", "rollout", "train"))
                  + f"{med(x['rollout' + suffix]) / med(x['total' + suffix]):15.0%}" + extra)
        rs = {k: med(t[k + suffix]) / med(o[k + suffix]) for k in ("total", "rollout", "train")}
        print("  ratio TRL/ours: " + ", ".join(f"{k} {v:.2f}x [{min(t[k + suffix]) / min(o[k + suffix]):.2f}]"
                                              for k, v in rs.items()))
        if not suffix:
            ratios = rs
    ok = ratios["total"] >= TARGET
    print(f"  target: step ratio >= {TARGET} -> {'MET' if ok else 'NOT MET'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=TINY, help="HF model directory (tokenizer from it, else the tiny one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads for both sides (default 1: on a shared machine, OpenMP threads "
                         "that wait on each other make a tiny model's steps 10-30x slower)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per side")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="activation checkpointing on both sides (default off on both; TRL's own default is on)")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    import transformers
    import trl
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"device {device}, threads {torch.get_num_threads()}, "
          f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'} (both sides); model {args.model}")
    r = bench(args, device)
    print(f"total {time.perf_counter() - t0:.0f} s")
    report(r, args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
