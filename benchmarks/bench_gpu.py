"""GPU figures of issue 8: SFT tokens/s and MFU against transformers(+peft), decode bandwidth share.

    python benchmarks/bench_gpu.py [--config qwen3-0.6b] [--batch 8] [--seq 1024] [--steps 10] [--no-compile]
                                   [--peak-tflops F] [--bandwidth-gbs B]
    python benchmarks/bench_gpu.py --device cpu --config small --batch 2 --seq 64 --steps 2 --peak-tflops 1 \\
        --bandwidth-gbs 20 --no-compile        # a smoke run of the script itself, no figures worth recording

One random-weight Qwen3-0.6B-shaped checkpoint (benchmarks/bench_model.py writes it with transformers) is
loaded by both sides in bf16. Workloads, each interleaved ours/theirs so both share the card's state:

1. SFT step (forward + backward + AdamW) on `batch x seq` random tokens, full fine-tuning and LoRA
   (rank 16 on q,k,v,o,gate,up,down). Ours: the product path (hidden_only + chunked log-probs, fused
   AdamW), each block under torch.compile unless --no-compile. Theirs: AutoModelForCausalLM(labels=...)
   (+ peft.get_peft_model for LoRA), torch.compile on the model unless --no-compile.
   MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s, with model FLOPs per token =
   6 N + 12 L d_attn T (PaLM's formula; N = matmul parameters incl. the head) for full fine-tuning and
   4 N + 12 L d_attn T for LoRA (frozen weights get no weight gradient). Targets: MFU >= 40%, >= 1.3x.
2. Decode at batch 1: greedy, 256 new tokens after a 32-token prompt, rollout.sampler.generate.
   Bandwidth limit = bandwidth / bytes read per token (every weight once, bf16) -> tokens/s; target:
   measured tokens/s >= 60% of it.

Peak FLOP/s and bandwidth come from the device name (H100 SXM: 989 TFLOP/s bf16 dense, 3350 GB/s; H200:
989, 4800; A100: 312, 2039) unless given. GRPO steps per minute: benchmarks/bench_grpo.py --device cuda.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


from benchmarks.bench_model import CONFIGS, sync, write_random_checkpoint  # noqa: E402
from losses.common import sequence_logprobs  # noqa: E402
from losses.sft import sft_loss  # noqa: E402
from lora.inject import apply_adapters  # noqa: E402
from model.load import load_model  # noqa: E402
from rollout.sampler import SamplingConfig, generate  # noqa: E402

CARDS = {"H200": (989e12, 4800e9), "H100 PCIe": (756e12, 2000e9), "H100": (989e12, 3350e9), "A100": (312e12, 2039e9)}
TARGETS = {"mfu": 0.40, "ratio": 1.3, "bandwidth": 0.60}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def card_limits(device, args) -> tuple[float, float]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    found = next((v for k, v in CARDS.items() if k in name), (None, None))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else found[0]
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else found[1]
    if peak is None or bw is None:
        raise SystemExit(f"unknown device {name!r}: pass --peak-tflops and --bandwidth-gbs")
    return peak, bw


def flops_per_token(model, seq: int, lora: bool) -> float:
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name
            and "lora_" not in name)
    n += c.vocab_size * c.hidden_size  # the head (tied: the embedding matrix used as a matmul)
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq
    return (4 if lora else 6) * n + attn


def ours_step(directory, device, args, lora: bool):
    model, _ = load_model(directory, dtype=torch.bfloat16, device=device, with_tokenizer=False)
    if lora:
        apply_adapters(model, kind="lora", rank=16, alpha=32, dropout=0.0, targets=LORA_TARGETS)
    if args.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    model.train()

    def step(ids):
        logp, mask = sequence_logprobs(model, ids, torch.ones_like(ids))
        loss, _ = sft_loss(logp, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def theirs_step(directory, device, args, lora: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    fwd = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    model.train()

    def step(ids):
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def bench_sft(directory, device, args, peak, lora: bool) -> None:
    ids = torch.randint(3, CONFIGS[args.config]["vocab_size"], (args.batch, args.seq), device=device)
    sides = {"ours": ours_step(directory, device, args, lora), "transformers" + ("+peft" if lora else ""):
             theirs_step(directory, device, args, lora)}
    times = {k: [] for k in sides}
    for _ in range(args.warmup):
        for _, step in sides.values():
            step(ids)
    for i in range(args.steps):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            sync(device)
            t = time.perf_counter()
            sides[name][1](ids)
            sync(device)
            times[name].append(time.perf_counter() - t)
    fpt = flops_per_token(sides["ours"][0], args.seq, lora)
    tokens = args.batch * args.seq
    print(f"\nSFT step, {'LoRA r16' if lora else 'full'}, bf16, {args.batch} x {args.seq} tokens, "
          f"compile={args.compile}; model FLOPs/token {fpt / 1e9:.2f} G")
    rate = {}
    for name, ts in times.items():
        rate[name] = tokens / statistics.median(ts)
        print(f"  {name:18s} {rate[name]:10,.0f} tokens/s   MFU {rate[name] * fpt / peak:6.1%}")
    other = [k for k in rate if k != "ours"][0]
    r, mfu = rate["ours"] / rate[other], rate["ours"] * fpt / peak
    print(f"  ours / {other}: {r:.2f}x (target >= {TARGETS['ratio']}x: {'met' if r >= TARGETS['ratio'] else 'NOT met'}); "
          f"MFU target >= {TARGETS['mfu']:.0%}: {'met' if mfu >= TARGETS['mfu'] else 'NOT met'}")
    del sides
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_decode(directory, device, args, bandwidth) -> None:
    model, _ = load_model(directory, dtype=torch.bfloat16, device=device, with_tokenizer=False)
    prompt = [torch.randint(3, model.config.vocab_size, (32,)).tolist()]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    for _ in range(2):
        generate(model, prompt, cfg, stop_token_ids=[], pad_id=0)
    ts = []
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        generate(model, prompt, cfg, stop_token_ids=[], pad_id=0)
        sync(device)
        ts.append(time.perf_counter() - t)
    tps = args.new_tokens / statistics.median(ts)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = bandwidth / weight_bytes
    print(f"\nDecode, batch 1, {args.new_tokens} new tokens: {tps:,.0f} tokens/s; bandwidth limit "
          f"{limit:,.0f} tokens/s ({weight_bytes / 1e9:.2f} GB of weights per token): {tps / limit:.1%} "
          f"(target >= {TARGETS['bandwidth']:.0%}: {'met' if tps / limit >= TARGETS['bandwidth'] else 'NOT met'})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="qwen3-0.6b", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--bandwidth-gbs", type=float)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    peak, bandwidth = card_limits(device, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}; config {args.config}; "
          f"peak {peak / 1e12:.0f} TFLOP/s, bandwidth {bandwidth / 1e9:.0f} GB/s")
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(args.config, d)
        for lora in (False, True):
            bench_sft(d, device, args, peak, lora)
        bench_decode(d, device, args, bandwidth)


if __name__ == "__main__":
    main()
