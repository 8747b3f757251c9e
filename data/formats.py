"""JSONL readers with validation, and tokenization that honours the loss-mask contract.

Three rules shape this file:

* **Bad input gets a clear error, never half a result.** `read_jsonl` reads and checks the whole
  file before returning anything; the first bad line raises `DataError` with
  `"{path}:{lineno}: field '{field}': expected {what}, got {value}"`, always on one line (characters
  that would break it are escaped). The formats (field names from the seeds) are declared once, in
  FORMATS, as plain per-field checks. `data/validate.py` reads with the same `parse_line` and
  `validate`, so a line is good or bad the same way there, and there it is reported, not raised.
* **A line is strict JSON, read the same way by every reader.** Python's json module accepts more
  than JSON and some of it breaks later, far from the file: duplicate keys (last wins silently;
  other readers keep the first), NaN/Infinity literals, lone surrogate escapes (`"\\ud800"` is a
  str the tokenizer cannot take), integers of thousands of digits (Python refuses to convert them,
  a ValueError without a line), nesting deep enough for a RecursionError. Each is refused here with
  the field it sits in.
* **Masks are the contract.** A tokenized example is `{input_ids, loss_mask, truncated}` with
  loss_mask 1 exactly on completion tokens. Prompt and completion are rendered with the chat
  template and tokenized separately, so the boundary is exact (no offset arithmetic on one string).
  Truncation keeps the start and cuts the end, and is always counted and reported; a generation
  prompt is cut from the left instead (its end, the question and the assistant header, is what the
  model answers). Only the text that can survive truncation is tokenized, so a 10 MB line costs
  what a max_length line costs.
"""
from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections import Counter

import torch

from data import hf

# ----------------------------------------------------------------------------- errors and checks
MAX_SHOWN = 60    # characters of a bad value shown in an error
MAX_DEPTH = 32    # nesting of one line's JSON value (the formats need 3: object > array > object)
MAX_DIGITS = 1000  # digits of an integer literal (Python refuses to convert more than 4300)


def one_line(text: str) -> str:
    """`text` with every character that could break a one-line message (newlines, control
    characters, lone surrogates, BOMs, line separators) written as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class DataError(ValueError):
    """A data file is malformed; the message names the file, the line and the field.

    `kind` says which check failed (encoding, json, schema, group_size, file, empty) and `line` which
    line, where the error is not about the line being read (group sizes), for data/validate.py.
    """

    def __init__(self, message: str, kind: str = "schema", line: int | None = None):
        super().__init__(one_line(message))
        self.kind, self.line = kind, line


class _Refused:
    """A JSON value the parser would not build (NaN, an over-long integer); `_check_values`
    reports it with the field it sits in."""

    def __init__(self, expected: str, got: str):
        self.expected, self.got = expected, got

    def __str__(self):
        return self.got


class _DuplicateKeys(dict):
    """An object that named a key twice (kept as the last value, as json.loads would)."""

    def __init__(self, pairs, key):
        super().__init__(pairs)
        self.duplicate = key


def _object(pairs):
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    seen = set()
    key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return _DuplicateKeys(pairs, key)


def _integer(s: str):
    digits = len(s) - s.startswith("-")
    if digits > MAX_DIGITS:
        return _Refused(f"an integer of at most {MAX_DIGITS} digits", f"an integer of {digits} digits")
    return int(s)


def _constant(name: str):
    return _Refused("a JSON value (NaN and Infinity are not JSON numbers)", name)


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_integer, parse_constant=_constant)


def _shown(value) -> str:
    """A short description of a bad value for an error message."""
    if value is _MISSING:
        return "nothing (field missing)"
    if isinstance(value, _Refused):
        return value.got
    if isinstance(value, str) and not value.strip():
        return f"empty string {value[:MAX_SHOWN]!r}"
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
    if isinstance(value, str):
        value = value[:MAX_SHOWN + 1]  # never dump a 10 MB string to show 60 characters of it
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # an integer too long to print, nesting too deep to dump
        return kind
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return f"{kind} {text}"


_MISSING = object()


def _text(v):
    return isinstance(v, str) and v.strip() != ""


def _number(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float range: no loss can use it
        return False


def _bool(v):
    return isinstance(v, bool)


def _answer(v):
    return _text(v) or _number(v)


def _present(v):
    return v is not None


TEXT = (_text, "a non-empty string")
NUMBER = (_number, "a finite number")
BOOL = (_bool, "true or false")
ANSWER = (_answer, "a non-empty string or a number")
PRESENT = (_present, "a value other than null")
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
GROUPED = ("scored", "rlvr")  # formats whose `responses` are one group per line


def _fail(where: str, field: str | None, what: str, value, kind: str = "schema") -> DataError:
    prefix = f"{where}: field '{field}': " if field is not None else f"{where}: "
    return DataError(f"{prefix}expected {what}, got {_shown(value)}", kind)


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
        if not isinstance(role, str) or role not in ROLES:
            raise _fail(where, f"messages[{i}].role", "one of " + ", ".join(map(repr, ROLES)), role)
        _check_field(where, m, "content", TEXT, name=f"messages[{i}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, "messages", "at least one assistant message", [m["role"] for m in messages])


def _check_values(where, obj) -> None:
    """Every value in the record, at any depth, is one JSON can mean and Python can use: no
    refused literal, no key twice, no lone surrogate, no nesting past MAX_DEPTH."""
    stack = [(obj, None, 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _fail(where, path, f"values nested at most {MAX_DEPTH} deep", _Refused("", "deeper nesting"))
        if isinstance(value, _Refused):
            raise _fail(where, path, value.expected, value)
        if isinstance(value, str):
            _check_unicode(where, path, value)
        elif isinstance(value, dict):
            if isinstance(value, _DuplicateKeys):
                key = value.duplicate
                raise DataError(f"{where}: field '{_join(path, key)}': expected each key once per object, got it "
                                f"twice (readers disagree on which value wins)")
            for key in value:
                _check_unicode(where, _join(path, key), key)
            stack += [(v, _join(path, k), depth + 1) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(v, f"{path or ''}[{i}]", depth + 1) for i, v in reversed(list(enumerate(value)))]


def _join(path, key):
    return key if path is None else f"{path}.{key}"


def _check_unicode(where, path, s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        got = _Refused("", f"a lone surrogate {ascii(s[e.start])} at character {e.start + 1}")
        raise _fail(where, path, "Unicode text (surrogate escapes only in pairs)", got) from None


def validate(obj, fmt: str, where: str, require=()) -> None:
    """Raise DataError unless the parsed JSON value `obj` is a valid record of format `fmt`.

    `require`: fields this caller reads that the format leaves optional (GRPO's `answer` for a
    math reward, RLVR's `responses` for offline groups) or does not name at all (a reward's `tests`
    column); each must be there, and pass the format's check where it has one.
    """
    if not isinstance(obj, dict):
        raise _fail(where, None, "a JSON object", obj)
    _check_values(where, obj)
    if fmt == "sft":
        _check_sft(where, obj)
    else:
        for field, check, required in FORMATS[fmt]:
            if isinstance(check, list):
                _check_list(where, obj, field, check, required)
            else:
                _check_field(where, obj, field, check, required)
    spec = {field: check for field, check, _ in (FORMATS[fmt] or [])}
    for field in (require,) if isinstance(require, str) else require:
        check = spec.get(field, PRESENT)
        if isinstance(check, list):
            _check_list(where, obj, field, check, True)
        else:
            ok, what = check
            value = obj.get(field, _MISSING)
            if value is _MISSING or not ok(value):
                raise _fail(where, field, f"{what} (this run reads it)", value)


def group_size_errors(records: list[dict], linenos: list[int], path: str, fmt: str,
                      group_size: int | None = None) -> list[DataError]:
    """One DataError per scored/rlvr line whose group is not the size of the others.

    GRPO normalises rewards within groups of one size G, so a file of mixed sizes cannot train;
    without it crashed at the step that drew the odd row, after the run had started writing.
    The size is `group_size` when given (the run's num_generations), else the most common one.
    RLVR lines without responses (online problems) are not groups and are left out.
    """
    if fmt not in GROUPED:
        return []
    sizes = [(ln, len(r["responses"])) for r, ln in zip(records, linenos) if "responses" in r]
    if not sizes:
        return []
    if group_size is None:
        counts = Counter(n for _, n in sizes)
        group_size = max(counts, key=counts.get)  # ties: the first seen (Counter keeps insertion order)
        first = next(ln for ln, n in sizes if n == group_size)
        expected = f"{group_size} responses like the other groups (first at line {first})"
    else:
        expected = f"{group_size} responses (the run's group size)"
    return [DataError(f"{shown_path(path)}:{ln}: field 'responses': expected {expected}, got {n}", "group_size", ln)
            for ln, n in sizes if n != group_size]


# ----------------------------------------------------------------------------- reading
def shown_path(path: str) -> str:
    return one_line(os.fsdecode(path))


def open_data_file(path: str):
    """The file opened for binary reading, or a one-line error: FileNotFoundError for a missing
    file (as open() would), DataError for a directory, a FIFO or device, or a file we may not read.

    Only regular files: a FIFO blocks until a writer comes and reads once, and a run reads its
    files more than once."""
    shown = shown_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown}: data file not found") from None
    except OSError as e:
        raise DataError(f"{shown}: cannot read the data file ({e.strerror})", "file") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{shown}: expected a JSONL file, got a directory", "file")
    if not stat.S_ISREG(st.st_mode):
        what = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket or device"
        raise DataError(f"{shown}: expected a regular JSONL file, got {what}; write the data to a file", "file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{shown}: cannot read the data file ({e.strerror})", "file") from None


def read_lines(path: str):
    """(line number, bytes) for every line of the file, read one at a time."""
    with open_data_file(path) as f:
        try:
            yield from enumerate(f, start=1)
        except OSError as e:
            raise DataError(f"{shown_path(path)}: cannot read the data file ({e.strerror})", "file") from None


BLANK = object()  # parse_line's value for a blank line (None is JSON null)


def parse_line(raw: bytes, where: str, first: bool = False):
    """One line's bytes -> its JSON value, or BLANK for a blank line; DataError if it is not
    UTF-8 or not JSON. `first`: the file's first line, which may start with a BOM."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[max(0, e.start - 10):e.end + 10]
        hint = " (a UTF-16 file? save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{where}: expected UTF-8 text, got invalid bytes at column {e.start + 1}: {bad!r}{hint}",
                        "encoding") from None
    if first:
        line = line.lstrip("\ufeff")
    if not line.strip():
        return BLANK
    if line.startswith("\ufeff"):
        raise DataError(f"{where}: expected a JSON object, got a byte-order mark (U+FEFF) first: only the first line "
                        f"of a file may start with one (files joined with cat?)", "encoding")
    try:
        return _DECODER.decode(line)
    except json.JSONDecodeError as e:
        snippet = line.strip()
        snippet = snippet[:MAX_SHOWN] + ("..." if len(snippet) > MAX_SHOWN else "")
        what = e.msg.removesuffix(" at")  # "Invalid control character at" already ends with "at"
        raise DataError(f"{where}: expected a JSON object, got invalid JSON ({what} at column {e.colno}): {snippet}",
                        "json") from None
    except RecursionError:
        raise DataError(f"{where}: expected a JSON object with values nested at most {MAX_DEPTH} deep, got nesting "
                        f"too deep to read", "json") from None


def read_records(path: str, fmt: str, require=(), group_size: int | None = None) -> tuple[list[dict], list[int]]:
    """read_jsonl's records and the line number of each (a dataset source: data/hf.py, its row numbers)."""
    if hf.is_dataset_source(path):  # parquet / arrow / CSV / JSON / hub id; .jsonl never goes there
        return hf.read_records(path, fmt, require, group_size)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
    shown = shown_path(path)
    records, linenos = [], []
    for lineno, raw in read_lines(path):
        where = f"{shown}:{lineno}"
        obj = parse_line(raw, where, first=lineno == 1)
        if obj is BLANK:
            continue
        validate(obj, fmt, where, require)
        records.append(obj)
        linenos.append(lineno)
    if not records:
        raise DataError(f"{shown}: expected at least one JSON line of format {fmt!r}, got an empty file", "empty")
    errors = group_size_errors(records, linenos, path, fmt, group_size)
    if errors:
        raise errors[0]
    return records, linenos


def read_jsonl(path: str, fmt: str, require=(), group_size: int | None = None) -> list[dict]:
    """Every record of a JSONL file of format `fmt`, all validated before any is returned.

    A parquet / arrow / CSV / JSON file, a `save_to_disk` directory or a hub id is read through
    `datasets` (data/hf.py: `data.split`, `data.subset`, `data.columns`) and checked the same way.

    Blank lines are skipped; a file without any record is an error. `require`: fields the caller
    reads that the format leaves optional, e.g. `require=("answer",)` for a math reward (else a
    row without one would score 0 in silence). `group_size`: scored/rlvr groups must have exactly
    this many responses (without it they must all have the same number).
    """
    return read_records(path, fmt, require, group_size)[0]


# ----------------------------------------------------------------------------- tokenization
def warn(message: str) -> None:
    """A one-line data warning, printed once: by rank 0 under torchrun (every rank reads the same file)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


MARGIN = 16  # tokens next to a cut in the text that are re-tokenized from more text before they are kept


def _encode_head(text: str, tok, n: int) -> list[int]:
    """tok.encode(text)[:n], tokenizing only a prefix of the text long enough to hold n tokens.

    The prefix grows fourfold until it yields MARGIN tokens past the n kept, so the tokens kept
    are the ones the whole text gives (a cut changes the tokens next to it, not n + 16 back)."""
    size = 4 * (n + MARGIN) + 64
    while size < len(text):
        ids = tok.encode(text[:size])
        if len(ids) - MARGIN >= n:
            return ids[:n]
        size *= 4
    return tok.encode(text)[:n]


def _encode_tail(text: str, tok, n: int) -> list[int]:
    """tok.encode(text)[-n:] (n >= 1), tokenizing only a suffix of the text long enough."""
    size = 4 * (n + MARGIN) + 64
    while size < len(text):
        ids = tok.encode(text[-size:])
        if len(ids) - MARGIN >= n:
            return ids[-n:]
        size *= 4
    return tok.encode(text)[-n:]


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
        if max_length is None:
            ids = tok.encode(text)
        else:
            room = max_length + 1 - len(input_ids)  # one token past max_length tells that it was cut
            if room <= 0:
                break
            ids = _encode_head(text, tok, room)
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
    """One prompt + completion (preference chosen/rejected, kto, KTO's mismatched KL pairs) ->
    {input_ids, loss_mask, truncated}."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return _encode_pieces(_pieces(messages, tok), tok, max_length)


_SLOT = "\ue000prompt\ue000"  # private-use characters: where the prompt goes in the rendered template


def encode_prompt(prompt: str, tok, max_length: int | None = None) -> tuple[list[int], bool]:
    """(prompt ids for generation, whether they were cut): the chat template with the assistant
    generation prompt, at most `max_length` tokens.

    A longer prompt loses the start of its text: the template's own tokens before and after it
    (the user header, the assistant header the model answers after) are kept whole, and so is the
    end of the text, where the question usually is. A max_length shorter than the template
    alone is a ValueError (a config mistake, not the data's).
    """
    messages = [{"role": "user", "content": prompt}]
    if max_length is None:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), False
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = _encode_head(text, tok, max_length + 1)
    if len(ids) <= max_length:
        return ids, False
    head, _, tail = tok.apply_chat_template([{"role": "user", "content": _SLOT}],
                                            add_generation_prompt=True).partition(_SLOT)
    if text != head + prompt + tail:  # a template that rewrites the prompt: cut the rendered text instead
        return _encode_tail(text, tok, max_length), True
    head_ids, tail_ids = tok.encode(head), tok.encode(tail)
    room = max_length - len(head_ids) - len(tail_ids)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a prompt: the chat template alone is "
                         f"{len(head_ids) + len(tail_ids)} tokens")
    return head_ids + _encode_tail(prompt, tok, room) + tail_ids, True


def tokenize_prompt(prompt: str, tok, max_length: int | None = None) -> list[int]:
    """Prompt ids for generation (encode_prompt without the flag): the same ids every time for
    the same prompt, so a sampler can call it each step after read_prompts counted the cuts."""
    return encode_prompt(prompt, tok, max_length)[0]


def read_prompts(path: str, fmt: str, tok, max_length: int | None, field: str = "prompt", require=(),
                 group_size: int | None = None, overlong: str = "truncate") -> tuple[list[dict], dict]:
    """RL prompt rows (read_jsonl) with each prompt's length checked once, before training:
    -> (records, {"n", "truncated"}).

    A prompt longer than `max_length` tokens (chat template included) is counted and reported on
    one line, and tokenize_prompt(prompt, tok, max_length) cuts it from the left each time it is
    drawn; `overlong="error"` refuses the file instead, naming the first such line. Without a
    limit a 9k-token prompt is prefilled whole for every sample of its group.
    """
    if overlong not in ("truncate", "error"):
        raise ValueError(f"overlong={overlong!r}; expected 'truncate' or 'error'")
    records, linenos = read_records(path, fmt, require, group_size)
    shown, over = shown_path(path), []
    for r, ln in zip(records, linenos):
        if not _text(r.get(field, _MISSING)):
            raise _fail(f"{shown}:{ln}", field, TEXT[1] + " (the prompt this run samples from)", r.get(field, _MISSING))
        if max_length is not None and encode_prompt(r[field], tok, max_length)[1]:
            over.append(ln)
    if over and overlong == "error":
        raise DataError(f"{shown}:{over[0]}: field '{field}': expected a prompt of at most {max_length} tokens "
                        f"(chat template included), got more ({len(over)} of {len(records)} prompts are longer)")
    if over:
        warn(f"{shown}: {len(over)} of {len(records)} prompts are longer than {max_length} tokens "
             f"(first at line {over[0]}): their start is cut, the end kept")
    return records, {"n": len(records), "truncated": len(over)}


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
        warn(f"{path}: truncated {n_trunc} of {len(tokenized)} examples to max_length={max_length}{extra}")
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
