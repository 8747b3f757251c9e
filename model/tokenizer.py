"""Tokenizer: `tokenizer.json` through the `tokenizers` library, chat template through jinja2.

Why not `transformers.AutoTokenizer`: the product never imports transformers. Everything a
training run needs from a tokenizer is three things, all read from the files HF writes:
  * encode/decode (tokenizer.json, run by the Rust `tokenizers` library),
  * the special tokens eos/pad/bos (tokenizer_config.json, special_tokens_map.json, generation_config.json),
  * the chat template (tokenizer_config.json `chat_template`, or a `chat_template.jinja` file),
    rendered the way transformers renders it: a sandboxed jinja2 environment with
    trim_blocks + lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now`
    and a `tojson` filter that does not escape HTML.
The rendered text is then encoded without adding special tokens (the template already wrote them),
which is what `apply_chat_template(..., tokenize=True)` does.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _token_content(tok):
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    """The compiled template, built once per template string (compiling costs milliseconds per call)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render_template(template: str, **context) -> str:
    return _compile_template(template).render(**context)


@dataclass
class Tokenizer:
    """A HF tokenizer directory, usable without transformers.

    >>> tok = Tokenizer.from_dir("assets/tiny-qwen3")
    >>> ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
    ...                               add_generation_prompt=True, tokenize=True)
    """

    backend: _HFTokenizer
    chat_template: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    bos_token: str | None = None
    extra_eos_token_ids: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # tokenizer_config.json as read, written back on save

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{path}: no tokenizer.json (looked for {tj}); posttrain needs a fast tokenizer file")
        backend = _HFTokenizer.from_file(tj)
        config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        special = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
        gen = _read_json(os.path.join(path, "generation_config.json")) or {}

        def special_token(name):
            return _token_content(config.get(name)) or _token_content(special.get(name))

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        tok = cls(backend=backend, chat_template=template, eos_token=special_token("eos_token"),
                  pad_token=special_token("pad_token"), bos_token=special_token("bos_token"), config=config)
        gen_eos = gen.get("eos_token_id")
        if gen_eos is not None:
            tok.extra_eos_token_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        return tok

    # ---------------------------------------------------------------- ids of special tokens
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int:
        """The pad id; falls back to eos (as most chat models are trained) when the config has none."""
        pid = self.token_to_id(self.pad_token)
        return pid if pid is not None else self.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Every id that ends a generation: eos plus generation_config's eos list, without duplicates."""
        ids = [i for i in [self.eos_token_id, *self.extra_eos_token_ids] if i is not None]
        return list(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Render `messages` with the chat template; same text as transformers' apply_chat_template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        text = _render_template(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                pad_token=self.pad_token or "", **kwargs)
        return self.encode(text) if tokenize else text

    # ---------------------------------------------------------------- saving
    def save(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) as HF lays them out."""
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for name in ("eos_token", "pad_token", "bos_token"):
            config[name] = getattr(self, name)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        special = {k: getattr(self, k) for k in ("eos_token", "pad_token", "bos_token") if getattr(self, k)}
        with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2, ensure_ascii=False)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
