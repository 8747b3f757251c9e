"""ModelConfig: the fields of a Hugging Face `config.json` that the transformer needs.

`config.json` is read as HF writes it, for the three families this project supports:
  llama  (Llama 3.x; `rope_scaling` of type `llama3`; optional attention/mlp bias)
  qwen2  (Qwen2 / Qwen2.5: bias on q, k, v projections)
  qwen3  (Qwen3: RMSNorm on queries and keys per head, explicit head_dim)
RoPE settings come either as `rope_theta` + `rope_scaling` (what hub checkpoints carry) or as
`rope_parameters` (what transformers >= 5 writes); both are accepted. The whole dict is kept in
`raw` so a saved checkpoint writes back every field it was loaded with.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # llama: bias on q,k,v,o ; qwen2 always has q,k,v bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type '{self.model_type}' is not supported; expected one of {FAMILIES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    # ------------------------------------------------------------------ HF dict in/out
    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("raw", "rope_theta", "rope_scaling")}
        if "model_type" not in d:
            raise ValueError("config.json has no 'model_type'")
        return cls(**kw, rope_theta=float(theta), rope_scaling=scaling, raw=d)

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_hf(d)

    def to_hf(self) -> dict:
        """The config.json dict, in the classic hub layout (rope_theta + rope_scaling)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d = {k: v for k, v in self.raw.items() if k not in ("rope_parameters", "transformers_version")}
        d.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k != "raw"})
        d.setdefault("architectures", [arch])
        d.setdefault("hidden_act", "silu")
        d.setdefault("torch_dtype", "float32")
        return d

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf(), f, indent=2)
