"""JSONL readers with validation, and tokenization that honours the loss-mask contract.

Two rules shape this file:

* **Bad input gets a clear error, never half a result.** `read_jsonl` reads and checks the whole
  file before returning anything; the first bad line raises `DataError` with
  `"{path}:{lineno}: field '{field}': expected {what}, got {value}"`. The formats (field names from
  the seeds) are declared once, in FORMATS, as plain per-field checks.
* **Masks are the contract.** A tokenized example is `{input_ids, loss_mask, truncated}` with
  loss_mask 1 exactly on completion tokens. Prompt and completion are rendered with the chat
  template and tokenized separately, so the boundary is exact (no offset arithmetic on one string).
  Truncation keeps the start and cuts the end, and is always counted and reported.
"""
from __future__ import annotations

import json
import math
import os

import torch

# ----------------------------------------------------------------------------- errors and checks
MAX_SHOWN = 60  # characters of a bad value shown in an error


class DataError(ValueError):
    """A data file is malformed; the message names the file, the line and the field."""


def _shown(value) -> str:
    """A short description of a bad value for an error message."""
    if value is _MISSING:
        return "nothing (field missing)"
    if isinstance(value, str) and not value.strip():
        return f"empty string {value!r}"
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return f"{kind} {text}"


_MISSING = object()


def _text(v):
    return isinstance(v, str) and v.strip() != ""


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool(v):
    return isinstance(v, bool)


def _answer(v):
    return _text(v) or _number(v)


TEXT = (_text, "a non-empty string")
NUMBER = (_number, "a finite number")
BOOL = (_bool, "true or false")
ANSWER = (_answer, "a non-empty string or a number")
ROLES = ("system", "user", "assistant")

# fmt -> [(field, check, required)]; list fields are checked by _check_list below.
FORMATS = {
    "text": [("text", TEXT, True)],
    "sft": None,  # instruction/output or messages: see _check_sft
    "preference": [("prompt", TEXT, True), ("chosen", TEXT, True), ("rejected", TEXT, True)],
    "kto": [("prompt", TEXT, True), ("completion", TEXT, True), ("label", BOOL, True)],
    "prompt": [("prompt", TEXT, True), ("answer", ANSWER, False)],
    "scored": [("prompt", TEXT, True), ("responses", [("text", TEXT), ("score", NUMBER)], True)],
    "rlvr": [("problem", TEXT, True), ("solution", TEXT, True), ("responses", [("text", TEXT), ("correct", BOOL)], False)],
}


def _fail(where: str, field: str | None, what: str, value) -> DataError:
    prefix = f"{where}: field '{field}': " if field is not None else f"{where}: "
    return DataError(f"{prefix}expected {what}, got {_shown(value)}")


def _check_field(where, obj, field, check, required=True, name=None):
    name = name or field
    value = obj.get(field, _MISSING)
    if value is _MISSING and not required:
        return
    ok, what = check
    if value is _MISSING or not ok(value):
        raise _fail(where, name, what, value)


def _check_list(where, obj, field, item_fields, required):
    """A non-empty array of objects, each with item_fields; errors name e.g. `responses[2].score`."""
    value = obj.get(field, _MISSING)
    if value is _MISSING and not required:
        return
    if not isinstance(value, list) or not value:
        raise _fail(where, field, "a non-empty array of objects", value)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _fail(where, f"{field}[{i}]", "an object", item)
        for sub, check in item_fields:
            _check_field(where, item, sub, check, name=f"{field}[{i}].{sub}")


def _check_sft(where, obj):
    """Either instruction + output, or messages: [{role, content}, ...] with at least one assistant turn."""
    if "messages" not in obj:
        _check_field(where, obj, "instruction", TEXT)
        _check_field(where, obj, "output", TEXT)
        return
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _fail(where, "messages", "a non-empty array of {role, content} objects", messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _fail(where, f"messages[{i}]", "an object with role and content", m)
        role = m.get("role", _MISSING)
        if role not in ROLES:
            raise _fail(where, f"messages[{i}].role", "one of " + ", ".join(map(repr, ROLES)), role)
        _check_field(where, m, "content", TEXT, name=f"messages[{i}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, "messages", "at least one assistant message", [m["role"] for m in messages])


def validate(obj, fmt: str, where: str) -> None:
    """Raise DataError unless the parsed JSON value `obj` is a valid record of format `fmt`."""
    if not isinstance(obj, dict):
        raise _fail(where, None, "a JSON object", obj)
    if fmt == "sft":
        return _check_sft(where, obj)
    for field, check, required in FORMATS[fmt]:
        if isinstance(check, list):
            _check_list(where, obj, field, check, required)
        else:
            _check_field(where, obj, field, check, required)


# ----------------------------------------------------------------------------- reading
def read_jsonl(path: str, fmt: str) -> list[dict]:
    """Every record of a JSONL file of format `fmt`, all validated before any is returned.

    Blank lines are skipped; a file without any record is an error.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    records = []
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw[max(0, e.start - 10):e.end + 10]
            raise DataError(f"{where}: expected UTF-8 text, got invalid bytes at column {e.start + 1}: {bad!r}") from None
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            snippet = line.strip()
            snippet = snippet[:MAX_SHOWN] + ("..." if len(snippet) > MAX_SHOWN else "")
            raise DataError(f"{where}: expected a JSON object, got invalid JSON ({e.msg} at column {e.colno}): "
                            f"{snippet}") from None
        validate(obj, fmt, where)
        records.append(obj)
    if not records:
        raise DataError(f"{path}: expected at least one JSON line of format {fmt!r}, got an empty file")
    return records


# ----------------------------------------------------------------------------- tokenization
def _messages(ex: dict) -> list[dict]:
    if "messages" in ex:
        return ex["messages"]
    return [{"role": "user", "content": ex["instruction"]}, {"role": "assistant", "content": ex["output"]}]


def _pieces(messages: list[dict], tok) -> list[tuple[str, int]]:
    """Split the rendered chat into (text, trained) pieces: every assistant turn is trained on.

    Rendered incrementally: before assistant turn i the prompt is the chat up to i with the
    generation prompt; the completion is what rendering turn i adds after that.
    """
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                             "cannot separate prompt from completion tokens")
        pieces += [(prompt[len(done):], 0), (full[len(prompt):], 1)]
        done = full
    return [(text, trained) for text, trained in pieces if text]


def _encode_pieces(pieces, tok, max_length: int | None) -> dict:
    input_ids, loss_mask = [], []
    for text, trained in pieces:
        ids = tok.encode(text)
        input_ids += ids
        loss_mask += [trained] * len(ids)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    return {"input_ids": input_ids, "loss_mask": loss_mask, "truncated": truncated}


def tokenize_sft(ex: dict, tok, max_length: int | None) -> dict:
    """An sft record (instruction/output or messages) -> {input_ids, loss_mask, truncated}."""
    return _encode_pieces(_pieces(_messages(ex), tok), tok, max_length)


def tokenize_pair(prompt: str, completion: str, tok, max_length: int | None) -> dict:
    """One prompt + completion (preference chosen/rejected, kto) -> {input_ids, loss_mask, truncated}."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return _encode_pieces(_pieces(messages, tok), tok, max_length)


def tokenize_prompt(prompt: str, tok) -> list[int]:
    """Prompt ids for generation: the chat template with the assistant generation prompt."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)


def tokenize_text(text: str, tok, max_length: int | None) -> dict:
    """Pretraining text (special tokens in it are parsed as such); loss on every token."""
    return _encode_pieces([(text, 1)], tok, max_length)


_TOKENIZERS = {"sft": lambda ex, tok, n: tokenize_sft(ex, tok, n),
               "text": lambda ex, tok, n: tokenize_text(ex["text"], tok, n)}


def load_dataset(path: str, fmt: str, tok, max_length: int | None) -> tuple[list[dict], dict]:
    """Read, validate and tokenize an sft or text file -> (examples, {"n", "truncated", "dropped"}).

    Truncation is reported on one line, never silent. Examples left without any trained token
    (the prompt alone fills max_length) are dropped and counted.
    """
    if fmt not in _TOKENIZERS:
        raise ValueError(f"load_dataset tokenizes formats {sorted(_TOKENIZERS)}, not {fmt!r}; "
                         "use read_jsonl with tokenize_pair/tokenize_prompt for the others")
    records = read_jsonl(path, fmt)
    tokenized = [_TOKENIZERS[fmt](r, tok, max_length) for r in records]
    examples = [t for t in tokenized if any(t["loss_mask"])]
    n_trunc = sum(t["truncated"] for t in tokenized)
    dropped = len(tokenized) - len(examples)
    if n_trunc:
        extra = f" ({dropped} dropped: no completion token left)" if dropped else ""
        print(f"warning: {path}: truncated {n_trunc} of {len(tokenized)} examples to max_length={max_length}{extra}")
    return examples, {"n": len(examples), "truncated": n_trunc, "dropped": dropped}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of tokenized examples into LongTensors input_ids, attention_mask, loss_mask
    (and document_ids, -1 on padding, when the examples are packed rows)."""
    if not examples:
        raise ValueError("collate: empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.long)
    packed = "document_ids" in examples[0]
    docs = torch.full((len(examples), width), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attn[i, :n] = 1
        loss[i, :n] = torch.tensor(e["loss_mask"], dtype=torch.long)
        if packed:
            docs[i, :n] = torch.tensor(e["document_ids"], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    return {**batch, "document_ids": docs} if packed else batch


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Packed rows for padding-free SFT: consecutive tokenized examples concatenated while they fit
    in `max_length` tokens, each token tagged with its example's index in the row (`document_ids`).

    The model attends only within a document and restarts positions at each one
    (model/transformer.py), so a packed row computes what its examples would alone, without the
    padding a batch of mixed lengths carries. Order is kept; an example is never split.
    """
    rows, cur = [], None
    for e in examples:
        n = len(e["input_ids"])
        if cur is None or len(cur["input_ids"]) + n > max_length:
            cur = {"input_ids": [], "loss_mask": [], "document_ids": [], "truncated": False}
            rows.append(cur)
        doc = cur["document_ids"][-1] + 1 if cur["document_ids"] else 0
        cur["input_ids"] += e["input_ids"]
        cur["loss_mask"] += e["loss_mask"]
        cur["document_ids"] += [doc] * n
    return rows
