"""Triton NF4 dequantisation: one fused pass from packed bytes to the dense weight.

Each program reads BLOCK packed bytes, splits each into its two codes (element 2j is the high
nibble), rebuilds the byte's block scale from the double-quantised statistics,
    a = (absmax_codes[e // 64] - 128) * absmax_scale[e // (64 * 256)] + absmax_mean
looks the two levels up in the 16-entry NF4 table and writes level * a, interleaved, cast to the
output dtype. The arithmetic is the reference's (lora/nf4.py) op for op, in fp32, and the kernel is
compiled with FMA contraction off, so it equals `dequantize_nf4` bit for bit. bf16 output is rounded
to nearest even with integer ops on the fp32 bits (torch's rule), because the interpreter's own
fp32 -> bf16 cast truncates; fp16 goes through the ordinary cast (round to nearest even on both).

The kernel is tested on CPU under TRITON_INTERPRET=1 (set before triton is imported) against the
reference; on CUDA it is what NF4Linear's forward and backward call.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lora.nf4 import BLOCK, SUPER, NF4Tensor, nf4_levels

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BYTES_PER_PROGRAM = 1024


@triton.jit
def _dequant_kernel(codes_ptr, absq_ptr, scale_ptr, mean_ptr, levels_ptr, out_ptr, n_bytes, n,
                    BYTES: tl.constexpr, BYTES_PER_ABSMAX: tl.constexpr, ABSMAX_PER_SCALE: tl.constexpr,
                    BF16_BITS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BYTES + tl.arange(0, BYTES)
    ok = byte < n_bytes
    packed = tl.load(codes_ptr + byte, mask=ok, other=0).to(tl.int32)
    hi = (packed >> 4) & 15
    lo = packed & 15
    blk = byte // BYTES_PER_ABSMAX
    c = tl.load(absq_ptr + blk, mask=ok, other=128).to(tl.float32)
    s = tl.load(scale_ptr + blk // ABSMAX_PER_SCALE, mask=ok, other=0.0)
    m = tl.load(mean_ptr)
    a = (c - 128.0) * s + m
    v_hi = tl.load(levels_ptr + hi) * a
    v_lo = tl.load(levels_ptr + lo) * a
    vals = tl.reshape(tl.join(v_hi, v_lo), (2 * BYTES,))  # (BYTES, 2) row-major: hi0, lo0, hi1, lo1 ...
    elem = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    if BF16_BITS:  # round to nearest even by hand: the interpreter's own fp32 -> bf16 cast truncates
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + elem, bits.to(tl.int32).to(tl.int16), mask=elem < n)
    else:
        tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < n)


def dequantize_nf4_triton(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of `q` in `dtype` (default the original dtype), computed by the Triton kernel."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    n_bytes = q.codes.numel()
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    extra = {} if _INTERPRET else {"enable_fp_fusion": False}  # no FMA: (c - 128) * s + m rounds twice, as torch does
    bf16 = out.dtype == torch.bfloat16
    _dequant_kernel[grid](q.codes, q.absmax_codes, q.absmax_scale, q.absmax_mean, nf4_levels(q.device),
                          out.view(torch.int16) if bf16 else out, n_bytes, q.numel, BYTES=BYTES_PER_PROGRAM,
                          BYTES_PER_ABSMAX=BLOCK // 2, ABSMAX_PER_SCALE=SUPER, BF16_BITS=bf16, **extra)
    return out
