"""Peak memory of one SFT step with and without chunked log-probs, on a 150k vocabulary.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--batch 4] [--seq 512] [--hidden 512] [--layers 2]

A Qwen3-shaped model with random weights and Qwen's 151,936-token vocabulary (tied embeddings) runs
one forward + backward of the SFT loss over `batch x seq` tokens, two ways:

  chunked  what train.py runs: model(ids, hidden_only=True) + losses/common.py:token_logprobs, which
           projects onto the vocabulary a chunk of positions at a time (forward and backward), so the
           batch x seq x vocab fp32 logits never exist;
  full     the usual path (transformers' ForCausalLM loss): logits = model(ids) for every position,
           upcast to fp32, cross-entropy over them.

Each variant runs in a fresh subprocess so their peaks cannot mix. Peak = torch.cuda.max_memory_allocated
on CUDA; on CPU the process's peak resident set (ru_maxrss), reported both whole and above the
resident set measured after the model and batch were built (the step's own memory). The printed
`logits share` is (full - chunked) step memory / full step memory, and `logits removed` compares the
saving with the size of one fp32 logits tensor (batch x seq x vocab x 4 bytes). Target: the logits'
share of the peak removed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F


VOCAB = 151936


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step(args) -> dict:
    from losses.common import sequence_logprobs
    from losses.sft import sft_loss
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=args.hidden // 8, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_theta=1e6, tie_word_embeddings=True, model_type="qwen3", eos_token_id=0,
                         pad_token_id=0)
    model = Transformer(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.to(device).train()
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    if args.variant == "chunked":
        logp, m = sequence_logprobs(model, ids, mask)
        loss, _ = sft_loss(logp, m)
    else:
        logits = model(ids).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "peak": peak, "step": peak - base, "loss": loss.item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variant", choices=["chunked", "full"], help=argparse.SUPPRESS)  # the subprocess's job
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(one_step(args)))
        return
    gib = 1024 ** 3
    logits = args.batch * args.seq * VOCAB * 4
    print(f"SFT step, vocab {VOCAB}, batch {args.batch} x {args.seq} tokens, hidden {args.hidden}, "
          f"{args.layers} layers, {args.device}; one fp32 logits tensor = {logits / gib:.2f} GiB")
    res = {}
    for variant in ("chunked", "full"):
        cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--batch", str(args.batch),
               "--seq", str(args.seq), "--hidden", str(args.hidden), "--layers", str(args.layers)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[variant]
        print(f"  {variant:8s} peak {r['peak'] / gib:6.2f} GiB   step {r['step'] / gib:6.2f} GiB   loss {r['loss']:.4f}")
    c, f = res["chunked"], res["full"]
    saved = f["step"] - c["step"]
    print(f"  full / chunked step memory: {f['step'] / max(c['step'], 1):.1f}x; peak {f['peak'] / c['peak']:.2f}x")
    print(f"  logits share of the full step removed: {saved / f['step']:.0%}; saving = {saved / logits:.2f} x one "
          f"fp32 logits tensor; losses agree: {abs(c['loss'] - f['loss']) < 1e-3}")


if __name__ == "__main__":
    main()
