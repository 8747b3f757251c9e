"""Adapters on disk in PEFT's format, both ways.

A PEFT LoRA directory is `adapter_config.json` + `adapter_model.safetensors`. The tensor keys are the
module names of the transformers model under PeftModel's `base_model.model.` prefix, with the
adapter name removed:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,)   DoRA only
Our module names are the HF names, so the mapping is the prefix alone. `peft.PeftModel.from_pretrained`
on the transformers model loads what `save_adapter` writes, and `load_adapter` loads what PEFT
writes; the config fields we do not implement (rank/alpha patterns, bias training, fan_in_fan_out,
modules_to_save, layer selection ...) are refused with a clear error rather than half-honoured.
Loading is strict: every adapter tensor of the model must be in the file, with its shape, and the
file must hold nothing else.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from lora.inject import adapter_modules, adapter_state_dict, apply_adapters
from lora.layers import DoRALinear
from model.load import replace_dir

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _targets_for_config(model) -> list[str]:
    """Short names (`q_proj`) when they select exactly the wrapped modules, else the full names."""
    from lora.inject import _linears, match_targets
    wrapped = sorted(adapter_modules(model))
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    names = list(_linears(model)) + wrapped
    return short if sorted(set(match_targets(names, short))) == wrapped else wrapped


def adapter_config(model, base_model_name_or_path: str | None = None) -> dict:
    mods = adapter_modules(model)
    if not mods:
        raise ValueError("the model has no adapters to save")
    first = next(iter(mods.values()))
    for n, m in mods.items():
        if (type(m), m.rank, m.alpha, m.use_rslora) != (type(first), first.rank, first.alpha, first.use_rslora):
            raise ValueError(f"{n}: adapters of different kind/rank/alpha cannot share one PEFT config")
    dropout = getattr(first.lora_dropout, "p", 0.0)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": _targets_for_config(model), "use_dora": isinstance(first, DoRALinear),
        "use_rslora": first.use_rslora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "lora_bias": False,
        "revision": None,
    }


def save_adapter(model, directory: str, base_model_name_or_path: str | None = None, tokenizer=None) -> str:
    """Write the PEFT adapter directory atomically (temp dir + rename). Returns the directory."""
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config = adapter_config(model, base_model_name_or_path)
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(tmp)
    return replace_dir(tmp, directory)


_UNSUPPORTED = {  # field: the value we implement
    "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "exclude_modules": None,
    "use_qalora": False, "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None, "monteclora_config": None,
    "velora_config": None, "use_bdlora": None, "megatron_config": None,
}
# initialisations that rewrite the base weights too: the adapter file alone does not describe the model
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_adapter_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG} (not a PEFT adapter directory)")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' (with use_dora) is supported")
    for key, want in _UNSUPPORTED.items():
        have = cfg.get(key, want)
        if have != want and not (want in (None, {}, False) and not have):
            raise ValueError(f"{path}: field '{key}' is {have!r}; only {want!r} is supported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weights as well; convert the adapter "
                         f"to a plain LoRA with PEFT first (path_initial_model_for_weight_conversion)")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise ValueError(f"{path}: field '{key}' is missing")
    return cfg


def load_adapter(model, directory: str, quantize: bool = False, dropout: float | None = None) -> list[str]:
    """Inject the adapters `directory` describes (unless the model already has matching ones) and load
    their weights strictly. `quantize=True` puts them over an NF4 base (QLoRA). Returns wrapped names."""
    cfg = read_adapter_config(directory)
    kind = "dora" if cfg.get("use_dora") else "lora"
    existing = adapter_modules(model)
    if existing:
        names = sorted(existing)
        wrong = [n for n, m in existing.items() if (isinstance(m, DoRALinear), m.rank) != (kind == "dora", cfg["r"])]
        if wrong:
            raise ValueError(f"{directory}: the model's adapters differ from the config (kind/rank) at {wrong[:3]}")
    else:
        names = apply_adapters(model, kind=kind, rank=cfg["r"], alpha=cfg["lora_alpha"],
                               dropout=cfg.get("lora_dropout", 0.0) if dropout is None else dropout,
                               targets=cfg["target_modules"], use_rslora=bool(cfg.get("use_rslora")),
                               quantize=quantize)
    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {WEIGHTS}")
    found = load_file(path)
    found = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in found.items()}
    found = {k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v for k, v in found.items()}
    params = adapter_state_dict(model)
    missing = sorted(set(params) - set(found))
    unexpected = sorted(set(found) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model: missing {missing[:4]} "
                         f"({len(missing)} in all), unexpected {unexpected[:4]} ({len(unexpected)} in all)")
    with torch.no_grad():
        for k, p in params.items():
            if found[k].shape != p.shape:
                raise ValueError(f"{path}: {PREFIX + k} has shape {tuple(found[k].shape)}, the model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(found[k].to(p.dtype))
    return names
