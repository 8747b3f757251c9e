"""Hugging Face model directories in and out.

Loading builds the transformer on the meta device (no memory, no random init), reads the
safetensors files (one file, or shards listed in `model.safetensors.index.json`) and loads them
with `load_state_dict(strict=True, assign=True)`: every key must match by name, so a checkpoint of
the wrong family or size fails loudly instead of half-loading.

Saving writes what `transformers.AutoModelForCausalLM.from_pretrained` expects: config.json,
generation_config.json, the tokenizer files, and safetensors split into shards past
`max_shard_bytes` with an index. The directory is written under a temporary name and renamed when
complete, so a killed run never leaves half a checkpoint where a whole one is expected.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.hub import resolve_model_dir
from model.tokenizer import Tokenizer
from model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if auto_device().type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return state
    if os.path.isfile(single):
        return load_file(single)
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors checkpoints are read)")


def is_reward_model(config: ModelConfig) -> bool:
    """A `*ForSequenceClassification` checkpoint with one label: the transformer plus a scalar `score` head."""
    return any(a.endswith("ForSequenceClassification") for a in config.raw.get("architectures") or [])


def add_score_head(model: Transformer) -> None:
    """Attach HF's sequence-classification head (`score.weight`, one label) and mark the config so that
    save_model writes a checkpoint AutoModelForSequenceClassification loads."""
    c = model.config
    model.score = torch.nn.Linear(c.hidden_size, 1, bias=False)
    family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[c.model_type]
    c.raw.update(architectures=[f"{family}ForSequenceClassification"], id2label={"0": "LABEL_0"},
                 label2id={"LABEL_0": 0})


def load_model(path_or_id: str, dtype="auto", device=None, with_tokenizer: bool = True):
    """(model, tokenizer) from a HF directory or hub id. tokenizer is None when with_tokenizer=False."""
    directory = resolve_model_dir(path_or_id)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory}: no config.json")
    config = ModelConfig.from_file(cfg_path)
    dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else auto_device()
    with torch.device("meta"):
        model = Transformer(config)
        if is_reward_model(config):
            add_score_head(model)
    state = read_state_dict(directory)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tools write the tied copy too
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    model.reset_rope(device)
    tokenizer = Tokenizer.from_dir(directory) if with_tokenizer else None
    return model.eval(), tokenizer


def save_model(model: Transformer, directory: str, tokenizer: Tokenizer | None = None,
               max_shard_bytes: int = 2 * 1024**3, dtype=None) -> str:
    """Write a HF model directory atomically (temp dir + rename). Returns the directory."""
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config = model.config
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = config.to_hf()
    # both names: transformers 5 reads `dtype` (a loaded config may carry a stale one), older versions `torch_dtype`
    hf["dtype"] = hf["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    if tokenizer is not None:
        tokenizer.save(tmp)
        gen["eos_token_id"] = gen["eos_token_id"] if gen["eos_token_id"] is not None else tokenizer.eos_token_id
        gen["pad_token_id"] = gen["pad_token_id"] if gen["pad_token_id"] is not None else tokenizer.pad_token_id
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    return replace_dir(tmp, directory)


def replace_dir(tmp: str, directory: str) -> str:
    """Move a completely written `tmp` directory to `directory`, replacing what was there by renames
    (never a half-written `directory`)."""
    if os.path.isdir(directory):
        old = directory + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)
    return directory
