"""Hugging Face model directories in and out.

Loading builds the transformer on the meta device (no memory, no random init), reads the
safetensors files (one file, or shards listed in `model.safetensors.index.json`) and loads them
with `load_state_dict(strict=True, assign=True)`: every key must match by name, so a checkpoint of
the wrong family or size fails loudly instead of half-loading.

Before any tensor is read, the safetensors headers are checked against the model config.json
describes: every tensor present, none extra, every shape and dtype right, the shard index in
agreement with the shards. A directory that fails any check raises `ModelError` (a ValueError)
whose one-line message names the file, the tensor or field, and what was expected; a missing file
raises `MissingModelFile` (a ModelError that is also a FileNotFoundError). Tensors are then read one
at a time into the target dtype and device, so the peak memory is the model plus one tensor.

Saving writes what `transformers.AutoModelForCausalLM.from_pretrained` expects: config.json,
generation_config.json, the tokenizer files, and safetensors split into shards past
`max_shard_bytes` with an index. The directory is written under a temporary name and renamed when
complete, so a killed run never leaves half a checkpoint where a whole one is expected.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import MissingModelFile, ModelConfig, ModelError
from model.hub import resolve_model_dir
from model.tokenizer import Tokenizer, read_json
from model.transformer import Transformer

__all__ = ["ModelError", "MissingModelFile", "load_model", "save_model", "resolve_device", "resolve_dtype",
           "auto_device", "read_state_dict", "add_score_head", "is_reward_model", "replace_dir"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names of weight dtypes
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name) -> torch.device:
    """`device=` as a user writes it (auto, cpu, cuda, cuda:N, mps) -> a torch.device that exists here.

    Raises ValueError with one line for a name torch does not know (`tpu9`) and for a device this
    machine does not have (`cuda` on a CPU-only machine, `cuda:3` with two GPUs), instead of the
    RuntimeError torch raises at the first tensor moved there."""
    given = name
    if isinstance(name, torch.device):
        name = str(name)
    if isinstance(name, int) and not isinstance(name, bool):  # device=0 on the command line: cuda:0
        name = f"cuda:{name}"
    if name is None or name == "auto":
        return auto_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device '{given}': not a device name; expected {DEVICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device '{given}': CUDA is not available ({why}); use device=cpu or device=auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device '{given}': only {count} CUDA device(s) are visible (cuda:0 .. cuda:{count - 1})")
        return device
    if device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(f"device '{given}': MPS is not available on this machine; use device=cpu or device=auto")
        return device
    raise ValueError(f"device '{given}': device type '{device.type}' is not supported; expected {DEVICES}")


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if auto_device().type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------- weights
def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({_first_line(e)}); expected an 8-byte header "
                         f"length, a JSON header and the tensor bytes it lists") from None


def weight_headers(directory: str) -> tuple[str, dict[str, tuple[str, list[int], str]]]:
    """(the file that lists the weights, {tensor name: (file, shape, safetensors dtype)}) from the headers
    alone. Checks the shard index against the shards and that every tensor is floating point."""
    index, single = os.path.join(directory, INDEX), os.path.join(directory, SINGLE)
    if os.path.isfile(index):
        listing = index
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: expected an object whose 'weight_map' maps each tensor name to its shard "
                             f"file, got {'no weight_map' if weight_map is None else repr(weight_map)[:80]}")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise ModelError(f"{index}: weight_map['{bad[0]}']: expected a shard file name, got {bad[1]!r}"[:300])
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        for shard in shards:
            if not shard or os.path.basename(shard) != shard or shard in (".", ".."):
                raise ModelError(f"{index}: shard '{shard}' is not a file name inside the model directory")
            if not os.path.isfile(os.path.join(directory, shard)):
                raise MissingModelFile(f"{index}: lists shard '{shard}', which is not in {directory}")
        files = [(os.path.join(directory, s), keys) for s, keys in sorted(shards.items())]
    elif os.path.isfile(single):
        listing, files = single, [(single, None)]
    else:
        raise MissingModelFile(f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
    headers = {}
    for path, listed in files:
        with _open(path) as f:
            keys = list(f.keys())
            for key in keys:
                if key in headers:
                    raise ModelError(f"{path}: tensor '{key}' is also in {headers[key][0]}; expected each tensor "
                                     f"in one shard")
                s = f.get_slice(key)
                headers[key] = (path, list(s.get_shape()), s.get_dtype())
        if listed is not None:
            absent = sorted(set(listed) - set(keys))
            if absent:
                raise ModelError(f"{index}: lists tensor '{absent[0]}'{_more(absent)} in {os.path.basename(path)}, "
                                 f"which does not hold it")
    for key, (path, _, dtype) in headers.items():
        if dtype not in FLOAT_DTYPES:
            raise ModelError(f"{path}: tensor '{key}' has dtype {dtype}; expected floating-point weights "
                             f"({', '.join(FLOAT_DTYPES)})")
    return listing, headers


def read_state_dict(directory: str, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (one file or shards), cast to `dtype` on `device` one at a time."""
    _, headers = weight_headers(directory)
    return _read_tensors(headers, list(headers), dtype, device)


def _read_tensors(headers, keys, dtype, device) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(headers[key][0], []).append(key)
    state = {}
    for path, names in by_file.items():
        with _open(path) as f:
            for key in names:
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                    raise ModelError(f"{path}: tensor '{key}' cannot be read ({_first_line(e)})") from None
                state[key] = t.to(device=device, dtype=dtype or t.dtype)
    return state


# which config.json fields decide whether a tensor exists and what shape it has
_FIELDS = [(r"embed_tokens|lm_head", "vocab_size, hidden_size"),
           (r"q_proj", "num_attention_heads, head_dim, hidden_size"),
           (r"[kv]_proj", "num_key_value_heads, head_dim, hidden_size"),
           (r"o_proj", "num_attention_heads, head_dim, hidden_size"),
           (r"[qk]_norm", "head_dim"), (r"mlp\.", "intermediate_size, hidden_size"), (r"score", "hidden_size"),
           (r"norm", "hidden_size")]


def _fields(key: str, config: ModelConfig) -> str:
    names = next((f for pattern, f in _FIELDS if re.search(pattern, key)), "hidden_size").split(", ")
    if key.endswith(".bias"):
        names.append("mlp_bias" if ".mlp." in key else "attention_bias")
    if key.startswith("lm_head"):
        names.append("tie_word_embeddings")
    return ", ".join(f"{n}={getattr(config, n)}" for n in names)


def _more(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _check_against_model(headers, expected: dict[str, tuple], listing: str, config: ModelConfig, cfg_path: str):
    """The checkpoint's tensors are exactly the model's, shape for shape (before anything is read)."""
    missing = [k for k in expected if k not in headers]
    if missing:
        raise ModelError(f"{listing}: no tensor '{missing[0]}'{_more(missing)}, which the model {cfg_path} "
                         f"describes has ({_fields(missing[0], config)}, model_type={config.model_type})")
    extra = [k for k in headers if k not in expected]
    if extra:
        raise ModelError(f"{headers[extra[0]][0]}: tensor '{extra[0]}'{_more(extra)} is not part of the model "
                         f"{cfg_path} describes ({_fields(extra[0], config)}, model_type={config.model_type})")
    for key, shape in expected.items():
        path, got, _ = headers[key]
        if tuple(got) != tuple(shape):
            raise ModelError(f"{path}: tensor '{key}' has shape {list(got)}, but {cfg_path} "
                             f"({_fields(key, config)}) describes shape {list(shape)}")


def _check_layer_count(headers, listing: str, config: ModelConfig, cfg_path: str):
    """num_hidden_layers against the layers the weights hold, before a model of that depth is built."""
    layers = {int(m.group(1)) for k in headers if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    held = max(layers) + 1 if layers else 0
    if held != config.num_hidden_layers:
        what = f"{held} layers (model.layers.0 .. model.layers.{held - 1})" if held else "no model.layers.* tensors"
        raise ModelError(f"{cfg_path}: field 'num_hidden_layers' is {config.num_hidden_layers}, but {listing} "
                         f"holds {what}; expected them to agree")


def is_reward_model(config: ModelConfig) -> bool:
    """A `*ForSequenceClassification` checkpoint with one label: the transformer plus a scalar `score` head."""
    archs = config.raw.get("architectures") or []
    return isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs)


def add_score_head(model: Transformer) -> None:
    """Attach HF's sequence-classification head (`score.weight`, one label) and mark the config so that
    save_model writes a checkpoint AutoModelForSequenceClassification loads."""
    c = model.config
    model.score = torch.nn.Linear(c.hidden_size, 1, bias=False)
    family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[c.model_type]
    c.raw.update(architectures=[f"{family}ForSequenceClassification"], id2label={"0": "LABEL_0"},
                 label2id={"LABEL_0": 0})


def load_model(path_or_id: str, dtype="auto", device=None, with_tokenizer: bool = True):
    """(model, tokenizer) from a HF directory or hub id (see model/hub.py for how the path is resolved).
    tokenizer is None when with_tokenizer=False. Any defect of the directory is a ModelError."""
    directory = resolve_model_dir(path_or_id)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise MissingModelFile(f"{directory}: no config.json")
    config = ModelConfig.from_file(cfg_path)
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    listing, headers = weight_headers(directory)
    _check_layer_count(headers, listing, config, cfg_path)
    with torch.device("meta"):
        model = Transformer(config)
        if is_reward_model(config):
            add_score_head(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        headers.pop("lm_head.weight", None)  # some tools write the tied copy too
    _check_against_model(headers, expected, listing, config, cfg_path)
    tokenizer = Tokenizer.from_dir(directory) if with_tokenizer else None
    if tokenizer is not None:
        top = tokenizer.max_token_id
        if top >= config.vocab_size:
            raise ModelError(f"{os.path.join(directory, 'tokenizer.json')}: token id {top} "
                             f"({tokenizer.backend.id_to_token(top)!r}) is beyond the embedding of {cfg_path} "
                             f"(vocab_size={config.vocab_size}); expected every token id below vocab_size")
    state = _read_tensors(headers, list(expected), dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope(device)
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
        save_file(shards[0], os.path.join(tmp, SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
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
