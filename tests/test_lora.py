"""lora/layers.py and lora/inject.py: LoRA/DoRA against their formulas, merge, disable, injection, export.

The layers are checked against the formulas written out here with plain tensors (DoRA's gradient
against an autograd graph whose norm is explicitly detached), on odd sizes, over an nn.Linear and
over an NF4 base (QLoRA). The model-level checks use a tiny random Transformer built from
ModelConfig; the merged export is reloaded with model.load.load_model (strict HF names).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora.inject import (adapter_modules, adapters_disabled, apply_adapters, export_merged, merge_adapters,
                         merged_state_dict, trainable_parameters, unmerge_adapters)
from lora.layers import DoRALinear, LoRALinear
from lora.nf4 import NF4Linear
from model.config import ModelConfig
from model.load import load_model
from model.transformer import Transformer

IN, OUT, R = 37, 23, 5
KINDS = {"lora": LoRALinear, "dora": DoRALinear}


def _base(quantized: bool, seed: int = 0, bias: bool = True):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    return NF4Linear.from_linear(lin) if quantized else lin


def _perturb(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(layer):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _dense(base):
    return base.dequantized_weight() if isinstance(base, NF4Linear) else base.weight.detach()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fresh_adapter_equals_base_and_only_adapter_trains(kind, quantized):
    base = _base(quantized)
    x = torch.randn(3, 7, IN)
    with torch.no_grad():
        want = base(x)
    layer = KINDS[kind](base, R, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if kind == "dora" else set())
    if kind == "dora":
        torch.testing.assert_close(layer.lora_magnitude_vector, _dense(base).float().norm(dim=1))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_formula(use_rslora):
    base = _base(False)
    layer = LoRALinear(base, R, 12, use_rslora=use_rslora)
    _perturb(layer)
    s = 12 / math.sqrt(R) if use_rslora else 12 / R
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(4, IN)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    want = x @ base.weight.T + base.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("quantized", [False, True])
def test_dora_formula_and_detached_norm_gradient(quantized):
    base = _base(quantized)
    layer = DoRALinear(base, R, 8)
    _perturb(layer)
    x = torch.randn(6, IN)
    W, b, s = _dense(base), base.bias.detach(), 8 / R
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    V = W + s * B @ A
    want = (m / V.norm(dim=1).detach()) * (x @ V.T) + b  # the paper's §4.3: the norm is a constant
    y = layer(x)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m.grad)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_unmerge_and_disable(kind, quantized):
    base = _base(quantized)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        base_out = base(x)
    layer = KINDS[kind](base, R, 16)
    _perturb(layer)
    with torch.no_grad():
        y = layer(x)
        assert (y - base_out).abs().max() > 1e-2
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert torch.equal(layer(x), y)  # unmerge is exact: the base was never touched
        layer.disabled = True
        assert torch.equal(layer(x), base_out)
        layer.merge()  # disabled wins over merged
        assert torch.equal(layer(x), base_out)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dropout_only_in_training(kind):
    layer = KINDS[kind](_base(False), R, 16, dropout=0.5)
    _perturb(layer)
    x = torch.randn(8, IN)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


# ---------------------------------------------------------------------------------------- model level
def _tiny_model(seed=0, tie=False, bias=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="llama" if bias else "qwen3", vocab_size=61, hidden_size=32, intermediate_size=44,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                      tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_injection_targets_and_freezing():
    model = _tiny_model()
    names = apply_adapters(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert set(adapter_modules(model)) == set(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_A.weight", "lora_B.weight")}
    # per layer: q_proj A (4 x 32) + B (48 x 4), v_proj A (4 x 32) + B (24 x 4)
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * ((4 * 32 + 48 * 4) + (4 * 32 + 24 * 4))

    model = _tiny_model()
    names = apply_adapters(model, kind="dora", targets="all-linear")
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    model = _tiny_model()
    assert apply_adapters(model, targets=r"model\.layers\.1\.mlp\.(up|down)_proj") == \
        ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model)
    with pytest.raises(ValueError, match="match no linear"):
        apply_adapters(_tiny_model(), targets=("nope",))
    with pytest.raises(ValueError, match="never targets"):
        apply_adapters(_tiny_model(), targets=("q_proj", "lm_head"))


def test_qlora_quantises_every_decoder_linear():
    model = _tiny_model()
    names = apply_adapters(model, kind="lora", targets=("q_proj",), quantize=True)
    assert all(isinstance(m.base_layer, NF4Linear) for m in adapter_modules(model).values())
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, NF4Linear) and isinstance(layer.self_attn.k_proj, NF4Linear)
    assert isinstance(model.lm_head, nn.Linear)  # the head stays dense
    assert len(names) == 2


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_model_disable_merge_and_training_step(kind):
    model = _tiny_model(bias=True)
    ids = torch.randint(0, 61, (2, 9))
    base = _logits(model, ids)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters(model, kind=kind, rank=4, alpha=8)
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-5)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(2):
        loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tuned = _logits(model, ids)
    assert (tuned - base).abs().max() > 1e-3
    with adapters_disabled(model):
        assert torch.equal(_logits(model, ids), base)  # the reference model, no copy
        with adapters_disabled(model):
            pass
        assert torch.equal(_logits(model, ids), base)  # nesting keeps it disabled
    assert torch.equal(_logits(model, ids), tuned)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model, ids), tuned, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    assert torch.equal(_logits(model, ids), tuned)
    for k, v in model.state_dict().items():  # the base weights never moved
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace("base_layer.", "")]), k


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_export_merged_is_a_plain_hf_checkpoint(tmp_path, kind, quantize):
    model = _tiny_model(tie=quantize)
    plain_keys = set(model.state_dict())
    apply_adapters(model, kind=kind, rank=3, alpha=6, quantize=quantize)
    _perturb(model)
    ids = torch.randint(0, 61, (2, 7))
    want = _logits(model, ids)
    assert set(merged_state_dict(model)) == plain_keys
    export_merged(model, str(tmp_path / "merged"))
    loaded, _ = load_model(str(tmp_path / "merged"), dtype="fp32", device="cpu", with_tokenizer=False)
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_through_nf4_and_dora():
    model = _tiny_model()
    apply_adapters(model, kind="dora", rank=2, alpha=4, quantize=True)
    _perturb(model)
    ids = torch.randint(0, 61, (2, 6))
    model.train()
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in trainable_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
