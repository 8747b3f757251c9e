"""Putting adapters into a model, switching them off, merging them, exporting the merged model.

Targets follow PEFT's rules so the names in adapter_config.json mean the same thing here and in
PEFT: a list matches a module whose dotted name equals an entry or ends with "." + entry
(`"q_proj"` matches every `model.layers.N.self_attn.q_proj`); a string other than "all-linear" is a
regular expression that must match the whole name; "all-linear" is every linear layer but the
output head. `lm_head` and the embeddings are never adapted.

`quantize=True` is QLoRA: every decoder linear (targeted or not) becomes an NF4Linear, then the
targets are wrapped. `adapters_disabled(model)` runs the bare base model (the frozen reference of
DPO/KTO/GRPO) by flipping a flag on each wrapper; nothing is copied. `export_merged` writes a plain
HF checkpoint with the exact original names, dequantising NF4 layers.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from lora.layers import DoRALinear, LoRALinear
from lora.nf4 import NF4Linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = {"lora": LoRALinear, "dora": DoRALinear}
NEVER = ("lm_head", "embed_tokens")


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear)) and not any(part in NEVER for part in n.split("."))}


def match_targets(names, targets) -> list[str]:
    """The names that `targets` selects (PEFT's matching rules)."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return list(names)
        return [n for n in names if re.fullmatch(targets, n)]
    targets = list(targets)
    bad = [t for t in targets if t in NEVER]
    if bad:
        raise ValueError(f"{bad} cannot be adapted (lm_head and embeddings are never targets)")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_adapters(model: nn.Module, kind: str = "lora", rank: int = 16, alpha: float = 32, dropout: float = 0.0,
                   targets=DEFAULT_TARGETS, use_rslora: bool = False, quantize: bool = False) -> list[str]:
    """Freeze every parameter, (QLoRA: quantise every decoder linear to NF4,) wrap the targeted linears.

    Returns the dotted names of the wrapped modules. Call it after the model is on its device and in
    its dtype: adapters are created in fp32 on the base's device.
    """
    if kind not in KINDS:
        raise ValueError(f"adapter kind '{kind}' is not one of {sorted(KINDS)}")
    if adapter_modules(model):
        raise ValueError("the model already has adapters")
    linears = _linears(model)
    names = match_targets(linears, targets)
    if not names:
        raise ValueError(f"targets {targets!r} match no linear layer; the layers are e.g. {sorted(linears)[:8]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize:
        for n, m in linears.items():
            if isinstance(m, nn.Linear):
                linears[n] = NF4Linear.from_linear(m)
                _set(model, n, linears[n])
    for n in names:
        _set(model, n, KINDS[kind](linears[n], rank, alpha, dropout, use_rslora))
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: the parameters that require grad (after apply_adapters: the adapters)."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under in-model names: `X.lora_A.weight`, `X.lora_B.weight`, `X.lora_magnitude_vector`."""
    out = {}
    for n, m in adapter_modules(model).items():
        out[f"{n}.lora_A.weight"] = m.lora_A.weight
        out[f"{n}.lora_B.weight"] = m.lora_B.weight
        if isinstance(m, DoRALinear):
            out[f"{n}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model is its base (every adapter off); restored on exit, nesting-safe."""
    mods = list(adapter_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def merge_adapters(model: nn.Module):
    for m in adapter_modules(model).values():
        m.merge()


def unmerge_adapters(model: nn.Module):
    for m in adapter_modules(model).values():
        m.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The HF state dict of the merged model: `X.weight` (+ `X.bias`) for every wrapped or NF4 layer,
    every other tensor as it is (shared, not copied)."""
    special = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, NF4Linear))}
    special = {n: m for n, m in special.items() if not any(n.startswith(p + ".") for p in special)}  # outermost
    state = {}
    for k, v in model.state_dict().items():
        if not any(k.startswith(n + ".") for n in special):
            state[k] = v.detach()
    for n, m in special.items():
        if isinstance(m, LoRALinear):
            state[f"{n}.weight"] = m.merged_dense_weight()
            bias = m.bias
        else:
            state[f"{n}.weight"] = m.dequantized_weight()
            bias = m.bias
        if bias is not None:
            state[f"{n}.bias"] = bias.detach()
    return state


merged_copy_state_dict = merged_state_dict


def merged_model(model: nn.Module) -> nn.Module:
    """A plain Transformer (HF names) holding the merged weights; unadapted tensors are shared."""
    from model.transformer import Transformer
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    plain.reset_rope(plain.model.embed_tokens.weight.device)
    return plain.eval()


def export_merged(model: nn.Module, directory: str, tokenizer=None, dtype=None) -> str:
    """Write the merged model as a full HF checkpoint (model.load.save_model: atomic, sharded)."""
    from model.load import save_model
    return save_model(merged_model(model), directory, tokenizer, dtype=dtype)


__all__ = ["apply_adapters", "adapters_disabled", "merge_adapters", "unmerge_adapters", "merged_state_dict",
           "merged_copy_state_dict", "merged_model", "export_merged", "trainable_parameters", "adapter_modules",
           "adapter_state_dict", "match_targets", "DEFAULT_TARGETS"]
