"""posttrain's transformer vs `transformers` on the same weights, in one run, as ratios.

    python benchmarks/bench_model.py [--device cpu|cuda] [--dtype fp32|bf16]
                                     [--config small|qwen3-0.6b] [--model DIR] [--steps N] [--repeats N]
                                     [--threads N] [--timer wall|cpu] [--compile]

On a CPU shared with other jobs, `--threads 1 --timer cpu` (this process's CPU time) gives stable
figures where 2-thread wall time does not (oversubscribed OpenMP threads stall each other).

Both models are loaded from one Hugging Face directory (a random-weight checkpoint written by
`transformers` for `--config`, or `--model DIR`), so they hold identical weights. Two workloads:

1. Training step (forward + backward of a causal-LM loss over a batch of random tokens).
   ours:   model(ids, hidden_only=True) -> chunked token_logprobs -> mean NLL
           (losses/common.py:sequence_logprobs + losses/sft.py, the path train.py runs)
   theirs: AutoModelForCausalLM(ids, labels=ids).loss
   `--warmup` untimed steps each, then `--steps` timed steps, ours and theirs interleaved (and the
   order flipped every step) so that both share the machine's noise; the median is reported.
   On CUDA the peak memory of a step (above the resident weights) is reported too.
2. Greedy generation, batch 8 prompts of random tokens with mixed lengths (16-48), 128 new tokens,
   no early stop. ours: rollout.sampler.generate(temperature=0, stop_token_ids=[]);
   theirs: hf.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128) on the same prompts,
   left-padded. Tokens/s = batch x new tokens / time; median over `--repeats` interleaved runs.
   The two greedy outputs are compared token for token, a check that both compute the same thing.

Ratios are theirs_time / ours_time (> 1: ours is faster), of the medians and, in brackets, of the minima
(the minimum is the better estimate on a machine shared with other jobs). Targets: training >= 1.0,
generation >= 2.0. `--compile` adds a generation contestant that is not the product path: our forward
under torch.compile(dynamic=True), to measure what compiling the decode step would buy.
transformers is imported here only: the product never imports it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


from losses.common import sequence_logprobs  # noqa: E402
from losses.sft import sft_loss  # noqa: E402
from model.load import load_model  # noqa: E402
from rollout.sampler import SamplingConfig, generate  # noqa: E402

CONFIGS = {
    # big enough that matmuls, not Python, dominate a CPU step
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True),
    # Qwen3-0.6B's shape, random weights (for GPU)
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAIN_TARGET, GEN_TARGET = 1.0, 2.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_random_checkpoint(name: str, directory: str, seed: int = 0) -> None:
    """A random Qwen3 checkpoint made by transformers itself (from_config + save_pretrained)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    torch.manual_seed(seed)
    # initializer_range 0.1 (HF default 0.02): peaked enough next-token distributions that greedy outputs
    # vary instead of repeating one token, so the token-for-token comparison below means something
    cfg = Qwen3Config(**CONFIGS[name], max_position_embeddings=4096, rope_theta=1000000.0, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)


def load_both(directory: str, device, dtype):
    from transformers import AutoModelForCausalLM
    ours, _ = load_model(directory, dtype=dtype, device=device, with_tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    return ours, theirs


CLOCK = time.perf_counter  # --timer cpu: time.process_time


def timed(fn, device):
    sync(device)
    t = CLOCK()
    out = fn()
    sync(device)
    return CLOCK() - t, out


# ---------------------------------------------------------------------------------------- training
def bench_train(ours, theirs, args, device):
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g).to(device)
    loss_mask = torch.ones_like(ids)
    ours.train()
    theirs.train()

    def step_ours():
        logp, mask = sequence_logprobs(ours, ids, loss_mask)
        loss, _ = sft_loss(logp, mask)
        loss.backward()
        ours.zero_grad(set_to_none=True)
        return loss.detach()

    def step_theirs():
        loss = theirs(input_ids=ids, labels=ids).loss
        loss.backward()
        theirs.zero_grad(set_to_none=True)
        return loss.detach()

    steps = {"ours": step_ours, "theirs": step_theirs}
    times = {"ours": [], "theirs": []}
    peak = {}
    losses = {k: float(f()) for k, f in steps.items()}  # also the first warmup step
    for _ in range(args.warmup - 1):
        for f in steps.values():
            f()
    for i in range(args.steps):
        for name in (("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            dt, _ = timed(steps[name], device)
            times[name].append(dt)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() - base)
    ours.eval()
    theirs.eval()
    return times, peak, losses


# -------------------------------------------------------------------------------------- generation
def make_prompts(vocab, batch, seed=2, lo=16, hi=48):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def bench_generate(ours, theirs, args, device):
    pad = 0
    prompts = make_prompts(ours.config.vocab_size, args.gen_batch)
    P = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p)
        attention_mask[i, P - len(p):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    n_new = args.new_tokens
    cfg = SamplingConfig(max_new_tokens=n_new, temperature=0)
    eager_forward = ours.forward

    def gen_ours(forward=eager_forward):
        ours.forward = forward
        try:
            return generate(ours, prompts, cfg, stop_token_ids=[], pad_id=pad).completion_ids
        finally:
            ours.forward = eager_forward

    def gen_theirs():
        # eos_token_id=None: no stop and no min-length logit processor, so greedy is a plain argmax like ours
        with torch.no_grad():
            out = theirs.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                  max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad, eos_token_id=None,
                                  temperature=None, top_p=None, top_k=None)
        return out[:, P:]

    runs = {"ours": gen_ours, "theirs": gen_theirs}
    if args.compile:  # not the product path: what compiling the decode step would buy (see BENCHMARKS.md)
        compiled = torch.compile(eager_forward, dynamic=True)
        runs["ours+compile"] = lambda: gen_ours(compiled)
    outs = {k: f() for k, f in runs.items()}  # warmup (and compilation), and the outputs compared below
    times = {k: [] for k in runs}
    for i in range(args.repeats):
        names = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in names:
            dt, _ = timed(runs[name], device)
            times[name].append(dt)
    a, b = outs["ours"].cpu(), outs["theirs"].cpu()
    assert a.shape == b.shape == (len(prompts), n_new), (a.shape, b.shape)
    same_rows = int((a == b).all(1).sum())
    # tokens generated before the first disagreement (greedy paths diverge for good after one)
    diverge = [(int((x != y).nonzero()[0]) if (x != y).any() else n_new) for x, y in zip(a, b)]
    if "ours+compile" in outs:
        print(f"  (ours+compile greedy output identical to eager ours: {torch.equal(outs['ours+compile'].cpu(), a)})")
    return times, same_rows, diverge, len(prompts) * n_new


# -------------------------------------------------------------------------------------------- main
def ratio(times, slow, fast):
    """(median ratio, min ratio) of `slow` time over `fast` time."""
    return (statistics.median(times[slow]) / statistics.median(times[fast]), min(times[slow]) / min(times[fast]))


def print_table(times, unit, rate, rate_name, extra=None, extra_name=""):
    print(f"  {'':14s}{'median ' + unit:>15s}{'min':>8s}{rate_name:>10s}{extra_name:>10s}   all runs")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:14s}{m:15.3f}{min(ts):8.3f}{rate(m)}{(extra or {}).get(name, ''):>10s}   "
              + " ".join(f"{t:.3f}" for t in ts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--model", default=None, help="benchmark an existing HF model directory instead of --config")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per model")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per model")
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed generation runs per model")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--timer", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time (CPU device only; with --threads 1 it is robust to other jobs "
                        "time-sharing the cores, which wall time on a busy machine is not)")
    p.add_argument("--compile", action="store_true",
                   help="also time generation with torch.compile(dynamic=True) on our forward (slow to compile)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup)

    import transformers
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.timer == "cpu":
        if device.type != "cpu":
            sys.exit("--timer cpu measures host CPU time: use it with --device cpu")
        global CLOCK
        CLOCK = time.process_time

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model
        if directory is None:
            directory = os.path.join(tmp, args.config)
            write_random_checkpoint(args.config, directory)
        ours, theirs = load_both(directory, device, dtype)
    n_params = sum(t.numel() for t in ours.parameters())
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model: {args.model or args.config} ({n_params / 1e6:.1f}M params, {ours.config.num_hidden_layers} layers, "
          f"vocab {ours.config.vocab_size})  dtype {args.dtype}  device {dev_name}")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  "
          f"HF attention: {theirs.config._attn_implementation}  timer: {args.timer}  load average: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    rows = []
    if not args.skip_train:
        times, peak, losses = bench_train(ours, theirs, args, device)
        tok = args.batch * args.seq_len
        print(f"\ntraining step, batch {args.batch} x {args.seq_len} tokens, forward+backward "
              f"(first loss: ours {losses['ours']:.5f}, theirs {losses['theirs']:.5f})")
        print_table(times, "s/step", lambda m: f"{tok / m:10.0f}", "tokens/s",
                    {k: f"{v / 2**20:10.0f}" for k, v in peak.items()}, "peak MiB" if peak else "")
        if peak:
            print(f"  peak memory ours/theirs: {peak['ours'] / peak['theirs']:.2f}")
        rows.append(("training step speed (theirs/ours)", ratio(times, "theirs", "ours"), TRAIN_TARGET))

    if not args.skip_generate:
        print(f"\ngreedy generation, batch {args.gen_batch}, prompts 16-48 tokens, {args.new_tokens} new tokens")
        times, same_rows, diverge, n_tok = bench_generate(ours, theirs, args, device)
        print_table(times, "s/run", lambda m: f"{n_tok / m:10.1f}", "tokens/s")
        print(f"  greedy outputs identical in {same_rows}/{args.gen_batch} rows; tokens before first disagreement "
              f"per row: {diverge}")
        rows.append(("generation tokens/s (ours/theirs)", ratio(times, "theirs", "ours"), GEN_TARGET))
        if "ours+compile" in times:
            rows.append(("generation, ours+compile (not product)", ratio(times, "theirs", "ours+compile"), GEN_TARGET))

    print("\nsummary (ratio > 1: ours faster; of medians, [of minima])")
    for name, (r, r_min), target in rows:
        print(f"  {name:40s} {r:5.2f}x [{r_min:4.2f}x]  target >= {target:.1f}x: {'met' if r >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
