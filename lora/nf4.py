"""NF4: 4-bit NormalFloat weights (QLoRA), the quantiser, the PyTorch reference dequantiser and
the linear layer that trains through them.

Format (bitsandbytes' NF4 with double quantisation; `numel` n, blocks of 64, super-blocks of 256):
  codes         uint8 [nb * 32]   two 4-bit level indices a byte, element 2j in the HIGH nibble
  absmax_codes  uint8 [nb]        a_b = (absmax_codes[b] - 128) * absmax_scale[b // 256] + absmax_mean
  absmax_scale  fp32  [ceil(nb / 256)]   step of the 8-bit code: max |absmax - mean| of the super-block / 127
  absmax_mean   fp32  [1]         mean of the block absmaxes (the offset the 8-bit code is centred on)
  value(e) = NF4[code(e)] * a_(e // 64)       (fp32 multiply, then cast to the compute dtype)
nb = ceil(n / 64); the tail of the last block is padded with zeros. Storage is
4 + 8/64 + 32/(64*256) = 4.127 bits = 0.516 bytes per parameter (plus 4 bytes).

Two deliberate departures from bitsandbytes, both about the block scales, none about the 4-bit
codes' layout: (1) the 8-bit code of `absmax - mean` is a linear symmetric int8 code per 256
(bitsandbytes uses its 256-entry "dynamic" tree map); (2) each element's 4-bit code is chosen as the
level nearest to x / a_b with a_b the scale as it will be *dequantised* (after double quantisation),
not the exact fp32 absmax, so every element decodes to the nearest NF4 level its block can express.

The dequantisation arithmetic is written once, in the order the Triton kernel (nf4_triton.py) uses,
so the two agree bit for bit: a = (c - 128) * s + m, then level * a, each op rounded in fp32.

`NF4Linear` keeps only the packed tensors (buffers, so `.to(device)` moves them and state_dict holds
them). Its autograd Function dequantises in forward, lets the dense weight die, and dequantises
again in backward for grad_input = grad_out @ W; the weight is frozen and has no gradient, so
nothing but the packed weight is saved (not even the input). CPU runs the reference; CUDA the
Triton kernel; POSTTRAIN_NF4_TRITON=1 forces the kernel (tests run it with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

BLOCK = 64  # elements per absmax
SUPER = 256  # absmaxes per double-quantisation scale
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)


_LEVELS: dict[torch.device, torch.Tensor] = {}


def nf4_levels(device=None) -> torch.Tensor:
    """The 16 levels as fp32 on `device` (cached: no host-to-device copy per call)."""
    device = torch.device(device or "cpu")
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS[device]


@dataclass
class NF4Tensor:
    """A quantised weight: the packed codes, the double-quantised block scales, shape and dtype."""
    codes: torch.Tensor  # uint8 [nb * 32]
    absmax_codes: torch.Tensor  # uint8 [nb]
    absmax_scale: torch.Tensor  # fp32 [ceil(nb / 256)]
    absmax_mean: torch.Tensor  # fp32 [1]
    shape: torch.Size
    dtype: torch.dtype  # the dtype the weight had, and dequantises to by default

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes of storage, scales included."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax_codes, self.absmax_scale,
                                                            self.absmax_mean))


def block_absmax(q: NF4Tensor) -> torch.Tensor:
    """fp32 [nb] block scales a_b = (c_b - 128) * s_(b // 256) + m (two fp32 roundings, no FMA)."""
    nb = q.absmax_codes.numel()
    step = q.absmax_scale.repeat_interleave(SUPER)[:nb]
    return (q.absmax_codes.float() - 128.0) * step + q.absmax_mean


@torch.no_grad()
def quantize_nf4(w: torch.Tensor) -> NF4Tensor:
    """Quantise `w` (any shape, any float dtype) to NF4 with double-quantised block scales."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4 expects a floating point tensor, got {w.dtype}")
    n = w.numel()
    if n == 0:
        raise ValueError("quantize_nf4: empty tensor")
    nb = -(-n // BLOCK)
    flat = torch.zeros(nb * BLOCK, dtype=torch.float32, device=w.device)
    flat[:n] = w.detach().reshape(-1).float()
    blocks = flat.view(nb, BLOCK)

    # double quantisation of the block absmaxes: centre on their mean, int8 code per 256
    absmax = blocks.abs().amax(1)
    mean = absmax.mean().reshape(1)
    ns = -(-nb // SUPER)
    centred = torch.zeros(ns * SUPER, dtype=torch.float32, device=w.device)
    centred[:nb] = absmax - mean
    scale = centred.view(ns, SUPER).abs().amax(1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q8 = torch.round(centred.view(ns, SUPER) / safe[:, None]).clamp(-127, 127).reshape(-1)[:nb]
    absmax_codes = (q8 + 128).to(torch.uint8)
    q = NF4Tensor(torch.empty(0, dtype=torch.uint8, device=w.device), absmax_codes, scale, mean, w.shape, w.dtype)

    # 4-bit codes: nearest level to x / a_b, with a_b the scale as it will be dequantised
    a = block_absmax(q)
    a_safe = torch.where(a != 0, a, torch.ones_like(a))
    normed = torch.where((a != 0)[:, None], blocks / a_safe[:, None], torch.zeros_like(blocks))
    levels = nf4_levels(w.device)
    idx = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2, out_int32=True).to(torch.uint8).reshape(-1)
    q.codes = (idx[0::2] << 4) | idx[1::2]
    return q


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequantisation: NF4[code] * a_b in fp32, cast to `dtype` (default: the original dtype)."""
    idx = torch.stack((q.codes >> 4, q.codes & 15), dim=-1).reshape(-1)[:q.numel].long()
    a = block_absmax(q).repeat_interleave(BLOCK)[:q.numel]
    return (nf4_levels(q.device)[idx] * a).to(dtype or q.dtype).reshape(q.shape)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("POSTTRAIN_NF4_TRITON") == "1"


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dispatching dequantiser: Triton on CUDA (or when forced), the reference elsewhere."""
    if _use_triton(q.device):
        from lora.nf4_triton import dequantize_nf4_triton
        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4(q, dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantised on the fly; saves the packed weight only (W is frozen)."""

    @staticmethod
    def forward(ctx, x, codes, absmax_codes, absmax_scale, absmax_mean, shape):
        q = NF4Tensor(codes, absmax_codes, absmax_scale, absmax_mean, shape, x.dtype)
        ctx.save_for_backward(codes, absmax_codes, absmax_scale, absmax_mean)
        ctx.shape = shape
        return x @ dequantize(q, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        q = NF4Tensor(*ctx.saved_tensors, ctx.shape, grad_out.dtype)
        return grad_out @ dequantize(q, grad_out.dtype), None, None, None, None, None


def nf4_linear(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = _NF4Matmul.apply(x, q.codes, q.absmax_codes, q.absmax_scale, q.absmax_mean, q.shape)
    return y if bias is None else y + bias.to(y.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4. Computes in the input's dtype."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax_codes", q.absmax_codes)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_mean", q.absmax_mean)
        self.weight_dtype = q.dtype  # what dequantisation and the merged export produce
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, device=None) -> "NF4Linear":
        """Quantise `lin` (on `device` if given, e.g. quantise a CPU-loaded layer straight onto the GPU)."""
        w = lin.weight if device is None else lin.weight.to(device)
        b = lin.bias if (lin.bias is None or device is None) else lin.bias.to(device)
        return cls(quantize_nf4(w), b)

    @property
    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.codes, self.absmax_codes, self.absmax_scale, self.absmax_mean,
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.nf4, dtype or self.weight_dtype)

    def forward(self, x):
        return nf4_linear(x, self.nf4, self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the fp32 quantisation constants: they follow the device only,
        # and the dtype change is recorded as the dtype the weight dequantises to.
        keep = {k: self._buffers[k] for k in ("absmax_scale", "absmax_mean")}
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.codes.device))
        super()._apply(fn, recurse)
        for k, t in keep.items():
            self._buffers[k] = t.to(probe.device)
        self.weight_dtype = probe.dtype
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.weight_dtype}, nf4"
