"""Tokenizer: `tokenizer.json` through the `tokenizers` library, chat template through jinja2.

Why not `transformers.AutoTokenizer`: the product never imports transformers. Everything a
training run needs from a tokenizer is three things, all read from the files HF writes:
  * encode/decode (tokenizer.json, run by the Rust `tokenizers` library),
  * the special tokens (tokenizer_config.json; special_tokens_map.json only when the config has no
    `added_tokens_decoder`, and then it wins, as transformers 5 reads them; generation_config.json's
    eos ids),
  * the chat templates (`chat_template.jinja` and `additional_chat_templates/NAME.jinja` when present,
    else tokenizer_config.json's `chat_template`, a string or a list of named templates).

Rendering follows transformers 5.24's `apply_chat_template` (utils/chat_template_utils.py) rule for
rule, so the text is the same: a sandboxed jinja2 environment with trim_blocks + lstrip_blocks, the
loopcontrols extension, the `{% generation %}` tag, `raise_exception`, `strftime_now`, a `tojson`
filter that does not escape HTML; message keys whose value is None dropped; a message's reasoning
under any of its names (`reasoning_content`, `thinking`, `reasoning`) passed as both
`reasoning_content` and `thinking`; `tools` and `documents` passed as None when absent (templates
test `tools is not none`); every named special token in the context (and no key for one the
tokenizer does not have); the `tool_use` template when tools are given and the tokenizer has one.
The rendered text is then encoded without adding special tokens (the template already wrote them).
`return_assistant_tokens_mask=True` also returns 1 on every token that overlaps a `{% generation %}`
block (what transformers returns as `assistant_masks`).

Every file is checked when it is read: a file that is not valid JSON, a field of the wrong type, a
chat template that does not compile, an eos or pad token the vocabulary lacks, all raise
ModelError naming the file (and the line or field).
"""
from __future__ import annotations

import functools
import json
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from model.config import MissingModelFile, ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' order: the first is standard
TEMPLATE_DIR = "additional_chat_templates"


def read_json(path: str):
    """The parsed JSON file, None when there is no such file; ModelError naming file:line when it is not JSON."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_object(path: str) -> dict:
    data = read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _is_token_id(i, backend) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 and backend.id_to_token(i) is not None


def _token_content(tok, where: str, name: str):
    """tokenizer_config.json writes a special token as a string, as {"content": ...} or as null."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    if tok is not None and not isinstance(tok, str):
        raise ModelError(f"{where}: field '{name}': expected a token string, {{\"content\": ...}} or null, "
                         f"got {tok!r}")
    return tok


# ------------------------------------------------------------------------------------ templates
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while a tracker is active, records the
    character span of what it rendered (transformers' AssistantTracker, same positions)."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self._tracking = ContextVar("generation_spans", default=None)
        environment.extend(track_generation=self.track)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _mark(self, context, caller):
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list, spans: list):
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (transformers' guard against reaching CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore attributes ({name!r})")


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    """The compiled template, built once per template string (compiling costs milliseconds per call)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _render_template(template: str, **context) -> str:
    return _compile_template(template).render(**context)


def _render_tracked(template: str, **context) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its `{% generation %}` blocks."""
    compiled = _compile_template(template)
    blocks, spans = [], []
    with compiled.environment.track_generation(blocks, spans):
        for block in compiled.generate(**context):
            blocks.append(block)
    return "".join(blocks), spans


def _check_template(template, where: str) -> None:
    if not isinstance(template, str):
        raise ModelError(f"{where}: expected a chat template string, got {type(template).__name__}")
    try:
        _compile_template(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ModelError(f"{where} (template line {e.lineno}): not a valid jinja2 template ({e.message})") from None


def _normalise_messages(messages) -> list[dict]:
    """transformers' preparation: keys with None values dropped, reasoning under every name it is read by."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages: expected a list of message dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _token_mask(offsets, spans) -> list[int]:
    """1 on every token whose character span overlaps a generation span (transformers' rule, one pass)."""
    mask, j = [0] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j == len(spans):
            break
        if end > spans[j][0]:
            mask[i] = 1
    return mask


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
    special_tokens: dict = field(default_factory=dict)  # every named special token (unk_token, image_token ...)
    chat_templates: dict = field(default_factory=dict)  # named templates besides the default ("tool_use" ...)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise MissingModelFile(f"{path}: no tokenizer.json (looked for {tj}); posttrain needs a fast tokenizer "
                                   f"file")
        try:
            backend = _HFTokenizer.from_file(tj)
        except Exception as e:  # the Rust library raises a bare Exception for every defect
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{tj}: not a tokenizer file the tokenizers library reads ({text})") from None
        cfg_path = os.path.join(path, "tokenizer_config.json")
        stm_path = os.path.join(path, "special_tokens_map.json")
        gen_path = os.path.join(path, "generation_config.json")
        config, gen = _json_object(cfg_path), _json_object(gen_path)
        special, source = cls._special_tokens(config, cfg_path, stm_path)
        default, named = cls._templates(path, config, cfg_path)
        tok = cls(backend=backend, chat_template=default, eos_token=special.get("eos_token"),
                  pad_token=special.get("pad_token"), bos_token=special.get("bos_token"), config=config,
                  special_tokens=special, chat_templates=named)
        for name in ("eos_token", "pad_token"):
            if special.get(name) is not None and backend.token_to_id(special[name]) is None:
                raise ModelError(f"{source[name]}: field '{name}': {special[name]!r} is not a token of {tj}; "
                                 f"expected one of its tokens")
        gen_eos = gen.get("eos_token_id")
        ids = [gen_eos] if not isinstance(gen_eos, list) else gen_eos
        if gen_eos is not None and not all(_is_token_id(i, backend) for i in ids):
            raise ModelError(f"{gen_path}: field 'eos_token_id': expected a token id of {tj} (below "
                             f"{backend.get_vocab_size(with_added_tokens=True)}) or a list of them, got {gen_eos!r}")
        tok.extra_eos_token_ids = list(ids) if gen_eos is not None else []
        return tok

    @staticmethod
    def _special_tokens(config: dict, cfg_path: str, stm_path: str) -> tuple[dict, dict]:
        """({name: token} for every named special token, {name: the file it came from}), as transformers 5 builds
        its special_tokens_map: the seven standard names plus any other `*_token` string (model-specific tokens)."""
        found = dict(config)
        source = dict.fromkeys(config, cfg_path)
        if "added_tokens_decoder" not in config:  # legacy layout: special_tokens_map.json overrides the config
            for key, value in _json_object(stm_path).items():
                found[key], source[key] = value, stm_path
        extra = found.get("extra_special_tokens")
        if isinstance(extra, dict):
            for key, value in extra.items():
                found.setdefault(key, value)
                source.setdefault(key, source["extra_special_tokens"])
        special = {}
        for key, value in found.items():
            if key in NAMED_TOKENS:
                content = _token_content(value, source[key], key)
            elif key.endswith("_token") and isinstance(value, str):
                content = value
            else:
                continue
            if content is not None:
                special[key] = content
        return special, source

    @staticmethod
    def _templates(path: str, config: dict, cfg_path: str) -> tuple[str | None, dict]:
        """(default template, {name: template}) from the template files when there are any, else from the config."""
        files = {}
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            files["default"] = jinja_file
        extra_dir = os.path.join(path, TEMPLATE_DIR)
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    files[name[:-len(".jinja")]] = os.path.join(extra_dir, name)
        templates = {}
        if files:
            for name, file in files.items():
                try:
                    with open(file, encoding="utf-8") as f:
                        templates[name] = f.read()
                except UnicodeDecodeError as e:
                    raise ModelError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                _check_template(templates[name], file)
        else:
            given = config.get("chat_template")
            where = f"{cfg_path}: field 'chat_template'"
            if isinstance(given, list):  # [{"name": "default", "template": ...}, ...]
                for i, t in enumerate(given):
                    if not (isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t):
                        got = repr(t)[:80]
                        raise ModelError(f"{where}[{i}]: expected {{\"name\": ..., \"template\": ...}}, got {got}")
                    templates[t["name"]] = t["template"]
            elif given is not None:
                templates["default"] = given
            for name, t in templates.items():
                _check_template(t, where if name == "default" and not isinstance(given, list) else f"{where} '{name}'")
        default = templates.pop("default", None)
        return default, templates

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

    @property
    def max_token_id(self) -> int:
        """The largest id the tokenizer can produce (added tokens may sit past the base vocabulary)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """What a chat template sees as `bos_token`, `eos_token`, `unk_token` ...: only the tokens it has."""
        out = dict(self.special_tokens)
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is None:
                out.pop(name, None)
            else:
                out[name] = getattr(self, name)
        return out

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        """The template to render: a name or a template string if given, else `tool_use` when tools are given and
        the tokenizer has it, else the default (transformers' get_chat_template)."""
        if chat_template is not None:
            if chat_template == "default" and self.chat_template is not None:
                return self.chat_template
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise ValueError(f"this tokenizer has several chat templates and no default; pass chat_template= one of "
                             f"{sorted(self.chat_templates)}")
        raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            return_assistant_tokens_mask: bool = False, **kwargs):
        """Render `messages` with the chat template; same text as transformers' apply_chat_template.

        Returns the text, or with tokenize=True its ids, or with return_assistant_tokens_mask=True (needs
        tokenize=True) {"input_ids": ids, "assistant_masks": 1 on the tokens inside `{% generation %}` blocks}.
        Extra keyword arguments reach the template as variables (enable_thinking=False ...)."""
        template = self.get_chat_template(chat_template, tools)
        if return_assistant_tokens_mask:
            if not tokenize:
                raise ValueError("return_assistant_tokens_mask=True needs tokenize=True")
            if not re.search(r"\{%-?\s*generation\s*-?%\}", template):
                raise ValueError("return_assistant_tokens_mask=True, but the chat template has no "
                                 "{% generation %} block to mark the assistant tokens")
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value)):
                raise ValueError(f"{name}: expected a list of dicts (JSON schemas for tools), got {value!r}"[:300])
        context = dict(messages=_normalise_messages(messages), tools=tools, documents=documents,
                       add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        if not return_assistant_tokens_mask:
            text = _render_template(template, **context)
            return self.encode(text) if tokenize else text
        text, spans = _render_tracked(template, **context)
        enc = self.backend.encode(text, add_special_tokens=False)
        return {"input_ids": enc.ids, "assistant_masks": _token_mask(enc.offsets, spans)}

    # ---------------------------------------------------------------- saving
    def save(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) as HF lays them out."""
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for name in ("eos_token", "pad_token", "bos_token"):
            config[name] = getattr(self, name)
        if self.chat_templates:
            default = [{"name": "default", "template": self.chat_template}] if self.chat_template is not None else []
            config["chat_template"] = default + [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        special = {k: getattr(self, k) for k in ("eos_token", "pad_token", "bos_token") if getattr(self, k)}
        with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2, ensure_ascii=False)
