"""ModelConfig: the fields of a Hugging Face `config.json` that the transformer needs.

`config.json` is read as HF writes it, for the three families this project supports:
  llama  (Llama 3.x; `rope_scaling` of type `llama3`; optional attention/mlp bias)
  qwen2  (Qwen2 / Qwen2.5: bias on q, k, v projections; optional sliding-window layers)
  qwen3  (Qwen3: RMSNorm on queries and keys per head, explicit head_dim; optional sliding-window layers)
RoPE settings come either as `rope_theta` + `rope_scaling` (what hub checkpoints carry) or as
`rope_parameters` (what transformers >= 5 writes); both are accepted. The whole dict is kept in
`raw` so a saved checkpoint writes back every field it was loaded with.

Every field is checked for its type and range when the file is read (`from_hf`), because a wrong
value otherwise surfaces much later as a shape error deep in torch, or not at all: a missing
`tie_word_embeddings` silently tied a separate `lm_head` before. A field that is absent takes the
meaning it has for a hub checkpoint (untied embeddings, as transformers reads it), not the tiny
defaults this dataclass has for models built in code.
Any problem is a `ModelError` naming the file, the line and the field.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

FAMILIES = ("llama", "qwen2", "qwen3")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


class ModelError(ValueError):
    """A model directory that cannot be used as it is. The message is one line: the file (and line), the
    field or tensor, what was expected and what was found."""


class MissingModelFile(ModelError, FileNotFoundError):
    """A file the model directory needs is not there (also a FileNotFoundError, for callers that catch that)."""


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
    attention_bias: bool = False  # llama, qwen3: bias on q,k,v,o ; qwen2 always has q,k,v bias and no o bias
    mlp_bias: bool = False        # llama only; Qwen MLPs never have a bias (transformers ignores the field there)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ModelError(f"model_type '{self.model_type}' is not supported; expected one of {FAMILIES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def sliding_window(self) -> int | None:
        """Keys a sliding-window layer sees (itself included); None: no sliding layers. Qwen2/Qwen3 only, and
        only with `use_sliding_window: true`, as transformers reads it."""
        if self.model_type == "llama" or not self.raw.get("use_sliding_window"):
            return None
        return self.raw.get("sliding_window", 4096)

    @property
    def layer_types(self) -> list[str]:
        """'full_attention' or 'sliding_attention' per layer: config.json's `layer_types` if it has them, else
        the layers from `max_window_layers` on slide (transformers 5's rule)."""
        if self.sliding_window is None:
            return ["full_attention"] * self.num_hidden_layers
        given = self.raw.get("layer_types")
        if given is not None:
            return list(given)
        first = self.raw.get("max_window_layers", 28)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(self.num_hidden_layers)]

    # ------------------------------------------------------------------ HF dict in/out
    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json", text: str | None = None) -> "ModelConfig":
        """The config of a parsed config.json. `source` names the file in errors; `text` (the file's text)
        lets an error name the line of the field too."""
        check = _Checker(source, text)
        check.that(isinstance(d, dict), None, "a JSON object", d)
        d = dict(d)
        if "model_type" not in d:
            raise ModelError(f"{source}: no 'model_type' (expected one of {FAMILIES})")
        family = d["model_type"]
        check.that(family in FAMILIES, "model_type", f"one of {FAMILIES}", family)
        rope = d.get("rope_parameters")
        check.that(rope is None or isinstance(rope, dict), "rope_parameters", "an object", rope)
        rope = rope or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        check.number(theta, "rope_theta")
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        check.rope_scaling(scaling)

        for name in REQUIRED:
            if d.get(name) is None:
                raise ModelError(f"{source}: no field '{name}' (expected a positive integer; every config.json "
                                 f"of these families has it)")
        kw = {k: d[k] for k in cls.__dataclass_fields__
              if d.get(k) is not None and k not in ("raw", "rope_theta", "rope_scaling")}
        kw.update({k: d.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        # absent or null: not this dataclass's tiny-model defaults but what the field means for a hub checkpoint:
        # untied (transformers' default for all three families), one kv head per head (multi-head attention,
        # as transformers documents it), Qwen3's 128-wide heads
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw.setdefault("tie_word_embeddings", False)
        if family == "qwen3" and d.get("head_dim") is None:
            kw["head_dim"] = 128
        for name in (*REQUIRED, "num_key_value_heads", "max_position_embeddings", "head_dim"):
            if name in kw:
                check.positive_int(kw[name], name)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
            if d.get(name) is not None:
                check.that(isinstance(d[name], bool), name, "true or false", d[name])
        if "rms_norm_eps" in kw:
            check.number(kw["rms_norm_eps"], "rms_norm_eps")
        for name in ("bos_token_id", "pad_token_id"):
            check.that(kw[name] is None or _is_int(kw[name]), name, "an integer token id or null", kw[name])
        eos = kw["eos_token_id"]
        check.that(eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(i) for i in eos)),
                   "eos_token_id", "an integer token id, a list of them, or null", eos)
        act = d.get("hidden_act", "silu")
        check.that(act == "silu", "hidden_act", "'silu' (the only activation of these families)", act)
        if family != "llama":
            kw["mlp_bias"] = False  # transformers builds Qwen MLPs without bias whatever the field says
        heads, kv = kw["num_attention_heads"], kw["num_key_value_heads"]
        check.that(heads % kv == 0, "num_key_value_heads", f"a divisor of num_attention_heads={heads}", kv)
        config = cls(**kw, rope_theta=float(theta), rope_scaling=scaling, raw=d)
        check.that(config.head_dim > 0 and config.head_dim % 2 == 0, "head_dim",
                   "a positive even number (RoPE rotates pairs; hidden_size // num_attention_heads when absent)",
                   config.head_dim)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(config, name)
            for i in ids if isinstance(ids, list) else [ids]:
                check.that(i is None or 0 <= i < config.vocab_size, name,
                           f"a token id in [0, vocab_size={config.vocab_size})", i)
        if family != "llama" and d.get("use_sliding_window"):
            check.sliding(d, config.num_hidden_layers)
        return config

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise ModelError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.from_hf(d, source=path, text=text)

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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Checker:
    """Raises ModelError as '<file>:<line>: field '<name>': expected <what>, got <value>'."""

    def __init__(self, source: str, text: str | None):
        self.source, self.text = source, text

    def where(self, name: str | None) -> str:
        if name and self.text:
            m = re.search(r'"%s"\s*:' % re.escape(name.split(".")[-1]), self.text)
            if m:
                return f"{self.source}:{self.text.count(chr(10), 0, m.start()) + 1}"
        return self.source

    def that(self, ok: bool, name: str | None, expected: str, value) -> None:
        if not ok:
            what = f"field '{name}': " if name else ""
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ModelError(f"{self.where(name)}: {what}expected {expected}, got {shown}")

    def positive_int(self, value, name: str) -> None:
        self.that(_is_int(value) and value > 0, name, "a positive integer", value)

    def number(self, value, name: str) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        self.that(ok, name, "a positive number", value)

    def rope_scaling(self, s) -> None:
        self.that(s is None or isinstance(s, dict), "rope_scaling", "an object or null", s)
        if not s:
            return
        kind = s.get("rope_type", s.get("type", "default"))
        self.that(kind in ROPE_TYPES, "rope_type", f"one of {sorted(ROPE_TYPES)} (other RoPE scalings are not "
                  f"implemented)", kind)
        for key in ROPE_TYPES[kind]:
            self.that(key in s, f"rope_scaling.{key}", f"a number (rope_type '{kind}' needs it)", s.get(key))
            self.number(s[key], f"rope_scaling.{key}")
        if kind == "llama3":
            self.that(s["high_freq_factor"] > s["low_freq_factor"], "rope_scaling.high_freq_factor",
                      f"a number above low_freq_factor={s['low_freq_factor']}", s["high_freq_factor"])

    def sliding(self, d: dict, layers: int) -> None:
        window = d.get("sliding_window", 4096)
        self.that(window is None or (_is_int(window) and window > 0), "sliding_window", "a positive integer or null",
                  window)
        first = d.get("max_window_layers", 28)
        self.that(_is_int(first) and first >= 0, "max_window_layers", "a non-negative integer", first)
        types = d.get("layer_types")
        ok = types is None or (isinstance(types, list) and len(types) == layers
                               and all(t in LAYER_TYPES for t in types))
        self.that(ok, "layer_types", f"a list of {layers} (num_hidden_layers) entries from {LAYER_TYPES}", types)
