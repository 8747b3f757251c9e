"""lora/nf4.py and lora/nf4_triton.py: the NF4 format, the kernel, and NF4Linear's memory.

The Triton kernel runs on CPU under TRITON_INTERPRET=1, which must be set before triton is first
imported; other tests import triton normally, so the kernel checks run in a subprocess with its own
environment and must equal the PyTorch reference bit for bit (fp32, bf16, fp16; odd shapes, a tail
block, several double-quantisation super-blocks). The rest checks the format against its definition
(nearest level, nibble order, double-quantised scales, bytes per parameter) and that NF4Linear's
autograd graph holds the packed weight only.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora.nf4 as nf4
from lora.nf4 import NF4_LEVELS, NF4Linear, block_absmax, dequantize_nf4, quantize_nf4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = torch.tensor(NF4_LEVELS)


TRITON_SCRIPT = textwrap.dedent("""
    import os, torch
    from lora.nf4 import NF4Linear, quantize_nf4, dequantize_nf4
    from lora.nf4_triton import dequantize_nf4_triton
    torch.manual_seed(0)
    # odd shapes: a partial last block, a partial last 256-super-block, > 1024 bytes (several programs)
    for shape in [(1,), (3, 5), (37, 101), (129, 131), (7, 3, 11)]:
        w = torch.randn(shape) * torch.rand(shape[-1])
        w.view(-1)[:64] = 0.0  # an all-zero block
        q = quantize_nf4(w)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            a, b = dequantize_nf4_triton(q, dt), dequantize_nf4(q, dt)
            assert a.dtype == b.dtype == dt and a.shape == b.shape == w.shape, (shape, dt)
            bits = torch.int32 if dt == torch.float32 else torch.int16  # compare the bits, not the values
            assert torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits)), (shape, dt)
    # NF4Linear through the kernel (forced) equals it through the reference, forward and backward
    lin = NF4Linear.from_linear(torch.nn.Linear(67, 29))
    x = torch.randn(3, 5, 67, requires_grad=True)
    outs = []
    for forced in ("1", "0"):
        os.environ["POSTTRAIN_NF4_TRITON"] = forced
        x.grad = None
        y = lin(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    print("TRITON_OK")
""")


def test_triton_kernel_equals_reference_bit_for_bit():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "TRITON_OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("shape", [(37, 101), (5,), (300, 67)])
def test_every_element_decodes_to_the_nearest_level_of_its_block(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.02
    w.view(-1)[3] = 0.3  # an outlier
    q = quantize_nf4(w)
    dq = dequantize_nf4(q, torch.float32).reshape(-1)
    a = block_absmax(q).repeat_interleave(64)[: w.numel()]
    cand = LEVELS[None, :] * a[:, None]  # every value the element's block can express
    err = (w.reshape(-1)[:, None] - cand).abs()
    chosen = (w.reshape(-1) - dq).abs()
    assert torch.all(chosen <= err.min(1).values + 1e-7 * a.abs())
    # and the dequantised value is one of them
    assert torch.all((cand - dq[:, None]).abs().min(1).values == 0)


def test_block_scales_are_double_quantised_absmax():
    torch.manual_seed(2)
    w = torch.randn(600, 70) * torch.linspace(0.1, 3, 70)  # 657 blocks: 3 super-blocks, the last partial
    q = quantize_nf4(w)
    n = w.numel()
    nb = -(-n // 64)
    assert q.absmax_codes.dtype == torch.uint8 and q.absmax_codes.shape == (nb,)
    assert q.absmax_scale.dtype == torch.float32 and q.absmax_scale.shape == (-(-nb // 256),)
    assert q.absmax_mean.dtype == torch.float32 and q.absmax_mean.numel() == 1
    flat = torch.zeros(nb * 64)
    flat[:n] = w.reshape(-1)
    absmax = flat.view(nb, 64).abs().amax(1)
    assert torch.allclose(q.absmax_mean, absmax.mean())
    step = q.absmax_scale.repeat_interleave(256)[:nb]
    assert torch.all((block_absmax(q) - absmax).abs() <= step / 2 * (1 + 1e-5) + 1e-7)


def test_packed_bytes_follow_the_layout():
    torch.manual_seed(3)
    n = 64 * 5 + 6  # a partial last block
    codes = torch.randint(0, 16, (n,))
    codes[::64] = 15  # level 1.0 in every block: the block absmax is its scale
    scales = torch.rand(-(-n // 64)) + 0.5
    w = LEVELS[codes] * scales.repeat_interleave(64)[:n]
    q = quantize_nf4(w)
    padded = torch.full((len(scales) * 64,), 7)  # zero padding encodes as level index 7 (0.0)
    padded[:n] = codes
    expected = (padded[0::2] << 4) | padded[1::2]  # element 2j in the high nibble
    assert q.codes.dtype == torch.uint8 and torch.equal(q.codes.long(), expected)
    # by hand: levels 3 and 12 make the byte 0x3C
    q = quantize_nf4(torch.tensor([LEVELS[3].item(), LEVELS[12].item(), 1.0, -1.0]))
    assert q.codes[0].item() == 0x3C and q.codes[1].item() == 0xF0


def test_storage_bytes_per_parameter():
    """4 + 8/64 + 32/(64*256) bits = 0.5159 bytes/param: the format's own bound (see lora/nf4.py)."""
    w = torch.randn(1024, 1024)
    q = quantize_nf4(w)
    per_param = q.nbytes() / w.numel()
    assert per_param <= 0.5 + 1 / 64 + 4 / (64 * 256) + 4 / w.numel() + 1e-9, per_param
    assert per_param < 0.516


def test_quantisation_error_and_degenerate_blocks():
    torch.manual_seed(4)
    w = torch.randn(64, 96)
    dq = dequantize_nf4(quantize_nf4(w))
    rel = (dq - w).norm() / w.norm()
    assert rel < 0.11, rel  # NF4's error on Gaussian weights is about 0.1
    for w in (torch.zeros(3, 70), torch.full((130,), 0.25), torch.tensor([1e-30, -2e-30, 0.0])):
        dq = dequantize_nf4(quantize_nf4(w), torch.float32)
        assert torch.isfinite(dq).all() and torch.allclose(dq, w, atol=1e-6 * max(1.0, w.abs().max().item()))
    dq16 = dequantize_nf4(quantize_nf4(torch.randn(7, 9, dtype=torch.bfloat16)))
    assert dq16.dtype == torch.bfloat16 and dq16.shape == (7, 9)


def test_nf4_linear_matches_dense_with_the_dequantised_weight():
    torch.manual_seed(5)
    lin = nn.Linear(45, 23)
    q = NF4Linear.from_linear(lin)
    w = q.dequantized_weight()
    x = torch.randn(2, 3, 45, requires_grad=True)
    y = q(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w, lin.bias)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    assert not q.bias.requires_grad and not any(p.requires_grad for p in q.parameters())


def test_nf4_linear_backward_keeps_no_dequantised_weight():
    torch.manual_seed(6)
    q = NF4Linear.from_linear(nn.Linear(256, 192, bias=False))
    x = torch.randn(4, 256, requires_grad=True)
    buffers = {t.data_ptr() for t in q.buffers()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    # 1) what autograd saves for backward: the packed buffers themselves, nothing of the weight's size
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert saved and all(t.data_ptr() in buffers for t in saved), [(t.dtype, t.shape) for t in saved]
    assert sum(t.numel() * t.element_size() for t in saved) <= 0.52 * 256 * 192

    # 2) every dense weight made in forward is dead once forward returns, and the backward one after backward
    made = []
    real = nf4.dequantize

    def tracking(qt, dtype=None):
        w = real(qt, dtype)
        made.append(weakref.ref(w))
        return w

    nf4.dequantize = tracking
    try:
        y = q(x)
        gc.collect()
        assert len(made) == 1 and made[0]() is None, "forward left its dequantised weight alive"
        y.sum().backward()
        gc.collect()
        assert len(made) == 2 and all(r() is None for r in made), "backward left a dequantised weight alive"
    finally:
        nf4.dequantize = real
    assert x.grad is not None


def test_nf4_linear_dtype_moves_and_state_dict():
    torch.manual_seed(7)
    lin = nn.Linear(40, 24)
    q = NF4Linear.from_linear(lin)
    scale = q.absmax_scale.clone()
    q.to(torch.bfloat16)
    assert q.weight_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.absmax_scale.dtype == torch.float32 and torch.equal(q.absmax_scale, scale)  # never rounded
    y = q(torch.randn(3, 40, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    q.float()
    fresh = NF4Linear.from_linear(nn.Linear(40, 24))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.dequantized_weight(), q.dequantized_weight())
