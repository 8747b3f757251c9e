"""data/formats.py and data/synthetic.py: every format read (tmp files and the shipped ones), every
bad input rejected with file, line and field, the loss-mask contract, truncation reporting, and the
synthetic world's promises (determinism, held-out split, the pretrain off-by-one bug rate)."""
import functools
import json
import os
import re

import pytest
import torch

from data import synthetic
from data.formats import (DataError, collate, load_dataset, read_jsonl, tokenize_pair, tokenize_prompt,
                          tokenize_sft, tokenize_text)

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "data", "synthetic")
SHIPPED_FORMATS = {
    "pretrain": "text", "sft_train": "sft", "sft_eval": "sft", "grpo_train": "prompt", "grpo_eval": "prompt",
    "multistep_train": "rlvr", "multistep_eval": "rlvr", "preference_train": "preference",
    "preference_eval": "preference", "kto_train": "kto", "kto_eval": "kto", "harmful_train": "prompt",
    "harmful_eval": "prompt", "harmless_train": "prompt", "harmless_eval": "prompt", "style_eval": "prompt",
    "scored_groups": "scored", "rlvr": "rlvr",
}
GOOD = {
    "text": {"text": "<|im_start|>user\nhi<|im_end|>\n"},
    "sft": {"instruction": "What is 2 + 3?", "output": "Answer: 5"},
    "preference": {"prompt": "What is 2 + 3?", "chosen": "Answer: 5", "rejected": "Answer: 6"},
    "kto": {"prompt": "What is 2 + 3?", "completion": "Answer: 5", "label": True},
    "prompt": {"prompt": "What is 2 + 3?", "answer": "5"},
    "scored": {"prompt": "p", "responses": [{"text": "Answer: 5", "score": 1.0}, {"text": "Answer: 6", "score": 0}]},
    "rlvr": {"problem": "p", "solution": "s", "responses": [{"text": "t", "correct": False}]},
}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                         {"role": "assistant", "content": "Answer: 5"}, {"role": "user", "content": "And 4 - 1?"},
                         {"role": "assistant", "content": "Answer: 3"}]}


def write_lines(path, lines):
    """Write JSON values (or raw str/bytes lines) one per line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(line).encode("utf-8") + b"\n")
    return str(path)


def shipped(name):
    return os.path.join(SHIPPED, f"{name}.jsonl")


@functools.lru_cache(maxsize=None)
def read_shipped(name):
    """Each shipped file is read (and validated) once per test session."""
    return read_jsonl(shipped(name), SHIPPED_FORMATS[name])


# ----------------------------------------------------------------------------- reading good files
@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_read_each_format(tmp_path, fmt):
    path = write_lines(tmp_path / "d.jsonl", [GOOD[fmt], "", "   ", GOOD[fmt]])
    assert read_jsonl(path, fmt) == [GOOD[fmt], GOOD[fmt]]


def test_read_variants(tmp_path):
    assert read_jsonl(write_lines(tmp_path / "m.jsonl", [MESSAGES]), "sft") == [MESSAGES]
    for rec in ({"prompt": "p"}, {"prompt": "p", "answer": 12}, {"prompt": "p", "answer": 2.5}):
        assert read_jsonl(write_lines(tmp_path / "p.jsonl", [rec]), "prompt") == [rec]
    no_responses = {"problem": "p", "solution": "s", "answer": "3"}
    assert read_jsonl(write_lines(tmp_path / "r.jsonl", [no_responses]), "rlvr") == [no_responses]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD["text"]).encode() + b"\r\n")
    assert read_jsonl(str(bom), "text") == [GOOD["text"]]


@pytest.mark.parametrize("name", sorted(SHIPPED_FORMATS))
def test_read_shipped(name):
    assert len(read_shipped(name)) >= 20


# ----------------------------------------------------------------------------- bad files
BAD = [  # (fmt, bad line, expected message after "path:3: ")
    ("text", '{"text": "a"', "expected a JSON object, got invalid JSON"),
    ("text", '["a"]', 'expected a JSON object, got array ["a"]'),
    ("text", "12", "expected a JSON object, got number 12"),
    ("text", {"text": 5}, "field 'text': expected a non-empty string, got number 5"),
    ("text", {"txt": "a"}, "field 'text': expected a non-empty string, got nothing (field missing)"),
    ("sft", {"instruction": "q", "output": ""}, "field 'output': expected a non-empty string, got empty string"),
    ("sft", {"instruction": "q"}, "field 'output': expected a non-empty string, got nothing (field missing)"),
    ("sft", {"output": "a"}, "field 'instruction': expected a non-empty string, got nothing"),
    ("sft", {"messages": []}, "field 'messages': expected a non-empty array"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "field 'messages[1].role': expected one of 'system', 'user', 'assistant', got string \"bot\""),
    ("sft", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "field 'messages[0].content': expected a non-empty string, got number 3"),
    ("sft", {"messages": [{"role": "user", "content": "q"}]}, "field 'messages': expected at least one assistant message"),
    ("preference", {"prompt": "p", "chosen": "c"}, "field 'rejected': expected a non-empty string, got nothing"),
    ("preference", {"prompt": "p", "chosen": ["c"], "rejected": "r"}, "field 'chosen': expected a non-empty string, got array"),
    ("kto", {"prompt": "p", "completion": "c", "label": "yes"}, "field 'label': expected true or false, got string \"yes\""),
    ("kto", {"prompt": "p", "completion": "c", "label": 1}, "field 'label': expected true or false, got number 1"),
    ("prompt", {"prompt": "  "}, "field 'prompt': expected a non-empty string, got empty string"),
    ("prompt", {"prompt": "p", "answer": [1]}, "field 'answer': expected a non-empty string or a number, got array"),
    ("prompt", {"prompt": "p", "answer": True}, "field 'answer': expected a non-empty string or a number, got boolean"),
    ("scored", {"prompt": "p", "responses": []}, "field 'responses': expected a non-empty array of objects, got array []"),
    ("scored", {"prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": "0"}]},
     "field 'responses[1].score': expected a finite number, got string \"0\""),
    ("scored", {"prompt": "p", "responses": ["a"]}, "field 'responses[0]': expected an object, got string"),
    ("rlvr", {"problem": "p", "solution": "s", "responses": [{"text": "t", "correct": 0}]},
     "field 'responses[0].correct': expected true or false, got number 0"),
    ("rlvr", {"problem": "p", "responses": [{"text": "t", "correct": True}]}, "field 'solution'"),
    ("rlvr", {"problem": "p", "solution": "s", "responses": [{"correct": True}]},
     "field 'responses[0].text': expected a non-empty string, got nothing (field missing)"),
]


@pytest.mark.parametrize("fmt, bad, message", BAD)
def test_bad_line_names_file_line_and_field(tmp_path, fmt, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD[fmt], "", bad, GOOD[fmt]])  # the blank line still counts
    with pytest.raises(DataError) as err:
        read_jsonl(path, fmt)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_non_utf8_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [GOOD["text"], b'{"text": "caf\xe9"}'])
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: expected UTF-8 text, got invalid bytes"):
        read_jsonl(path, "text")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: expected at least one JSON line")):
        read_jsonl(str(path), "sft")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        read_jsonl(str(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(ValueError, match="unknown data format 'dpo'"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", [GOOD["sft"]]), "dpo")


def test_nothing_is_tokenized_before_the_whole_file_is_valid(tmp_path):
    class NoTokenizer:
        def __getattr__(self, name):
            raise AssertionError("tokenizer used before validation finished")

    path = write_lines(tmp_path / "d.jsonl", [GOOD["sft"]] * 5 + [{"instruction": "q"}])
    with pytest.raises(DataError, match=":6: field 'output'"):
        load_dataset(path, "sft", NoTokenizer(), 64)


# ----------------------------------------------------------------------------- strict JSON (issue items 5-8)
def _first_key_twice(fmt):
    """GOOD[fmt] as a line whose first key is written twice (first value kept as the second)."""
    key, value = next(iter(GOOD[fmt].items()))
    return "{" + f"{json.dumps(key)}: {json.dumps(value)}, " + json.dumps(GOOD[fmt])[1:]


def _raises(path, fmt, match, line=3, fn=read_jsonl, **kw):
    """fn (read_jsonl) raises a one-line DataError that starts with path:line and contains `match`."""
    with pytest.raises(DataError) as err:
        fn(path, fmt, **kw)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: ") and match in message, message
    assert len(message.splitlines()) == 1 and message.isprintable(), message
    return message


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_deep_nesting_is_a_data_error_in_every_format(tmp_path, fmt):
    deep = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write_lines(tmp_path / "deep.jsonl", [GOOD[fmt], "", deep])
    _raises(path, fmt, "nested at most")
    # nesting Python can parse but nothing needs is refused with the field it sits in
    record = {**GOOD[fmt], "meta": functools.reduce(lambda v, _: [v], range(40), 1)}
    path = write_lines(tmp_path / "deep40.jsonl", [GOOD[fmt], "", record])
    _raises(path, fmt, "field 'meta" + "[0]" * 32 + "': expected values nested at most 32 deep")


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_duplicate_keys_are_refused_in_every_format(tmp_path, fmt):
    path = write_lines(tmp_path / "dup.jsonl", [GOOD[fmt], "", _first_key_twice(fmt)])
    key = next(iter(GOOD[fmt]))
    _raises(path, fmt, f"field '{key}': expected each key once per object, got it twice")


def test_duplicate_keys_deep_inside_name_their_field(tmp_path):
    line = '{"prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 0, "score": 1}]}'
    _raises(write_lines(tmp_path / "d.jsonl", [GOOD["scored"], "", line]), "scored",
            "field 'responses[1].score': expected each key once")


@pytest.mark.parametrize("line, field", [
    (r'{"text": "x\ud800"}', "text"),
    (r'{"text": "x\udfff y"}', "text"),
    (r'{"text": "ok", "\ud800": 1}', "\\ud800"),
])
def test_lone_surrogates_are_refused(tmp_path, line, field):
    path = write_lines(tmp_path / "s.jsonl", [GOOD["text"], "", line])
    message = _raises(path, "text", f"field '{field}': expected Unicode text")
    assert "lone surrogate" in message


def test_lone_surrogate_in_messages_and_pairs_still_read(tmp_path, tiny_tokenizer):
    line = (r'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\ud83d"}]}')
    _raises(write_lines(tmp_path / "m.jsonl", [GOOD["sft"], "", line]), "sft", "field 'messages[1].content'")
    pair = r'{"text": "emoji \ud83d\ude00 is a pair"}'  # a proper surrogate pair is one character
    rec = read_jsonl(write_lines(tmp_path / "p.jsonl", [pair]), "text")[0]
    assert rec["text"] == "emoji \U0001F600 is a pair" and tokenize_text(rec["text"], tiny_tokenizer, None)["input_ids"]


@pytest.mark.parametrize("fmt, line, match", [
    ("prompt", '{"prompt": "p", "answer": ' + "9" * 5000 + "}",
     "field 'answer': expected an integer of at most 1000 digits, got an integer of 5000 digits"),
    ("prompt", '{"prompt": "p", "answer": -' + "9" * 5000 + "}", "field 'answer'"),
    ("text", '{"text": "t", "id": ' + "1" * 4400 + "}", "field 'id': expected an integer of at most 1000 digits"),
    ("scored", '{"prompt": "p", "responses": [{"text": "a", "score": ' + "9" * 400 + "}]}",
     "field 'responses[0].score': expected a finite number, got number 9999"),
    ("scored", '{"prompt": "p", "responses": [{"text": "a", "score": NaN}]}',
     "field 'responses[0].score': expected a JSON value (NaN and Infinity are not JSON numbers), got NaN"),
    ("scored", '{"prompt": "p", "responses": [{"text": "a", "score": -Infinity}]}', "got -Infinity"),
    ("scored", '{"prompt": "p", "responses": [{"text": "a", "score": 1e999}]}',
     "expected a finite number, got number Infinity"),
    ("text", '{"text": "t", "weight": Infinity}', "field 'weight': expected a JSON value"),
])
def test_numbers_json_cannot_mean(tmp_path, fmt, line, match):
    _raises(write_lines(tmp_path / "n.jsonl", [GOOD[fmt], "", line]), fmt, match)


@pytest.mark.parametrize("line, match", [
    ('{"text": "a\x01b"}', "invalid JSON (Invalid control character at column 12): {\"text\": \"a\\x01b\"}"),
    ('{"text": "a\u2028b"', "invalid JSON"),                 # the snippet stays on one line
    ('\ufeff{"text": "a"}', "got a byte-order mark (U+FEFF) first"),  # a BOM is allowed on line 1 only
    ('{"text": "a"} {"text": "b"}', "Extra data"),
    ('"just a string"', "expected a JSON object, got string"),
    ("null", "expected a JSON object, got null"),
    ('{"text": "a", "text": "a"}', "each key once"),
])
def test_malformed_lines_give_one_line_errors(tmp_path, line, match):
    _raises(write_lines(tmp_path / "m.jsonl", [GOOD["text"], "", line]), "text", match)


def test_utf16_file_gets_a_hint(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_bytes(json.dumps(GOOD["text"]).encode("utf-16") + b"\n")
    with pytest.raises(DataError, match=r"u16\.jsonl:1: expected UTF-8 text.*UTF-16"):
        read_jsonl(str(path), "text")


def test_crlf_and_extra_fields_are_fine(tmp_path):
    path = tmp_path / "crlf.jsonl"
    rec = {**GOOD["kto"], "task": "arithmetic", "meta": {"source": ["a", 1, None]}}
    path.write_bytes(((json.dumps(rec) + "\r\n") * 2).encode())
    assert read_jsonl(str(path), "kto") == [rec, rec]


# ----------------------------------------------------------------------------- files that are not data files
def test_a_directory_a_fifo_and_an_unreadable_file_are_data_errors(tmp_path, monkeypatch):
    import data.formats as formats

    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: expected a JSONL file, got a directory")):
        read_jsonl(str(tmp_path), "sft")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe\.jsonl: expected a regular JSONL file, got a FIFO"):
        read_jsonl(str(fifo), "sft")  # refused before open(), which would block without a writer
    path = write_lines(tmp_path / "locked.jsonl", [GOOD["sft"]])

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(formats, "open", denied, raising=False)  # as chmod 000 would, even when run as root
    with pytest.raises(DataError, match=r"locked\.jsonl: cannot read the data file \(Permission denied\)"):
        read_jsonl(path, "sft")


# ----------------------------------------------------------------------------- groups and required columns (item 9)
def _group(n, prompt="p"):
    return {"prompt": prompt, "responses": [{"text": f"t{i}", "score": float(i % 2)} for i in range(n)]}


def test_groups_of_another_size_are_refused(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [_group(4), _group(4, "q"), _group(3, "r"), _group(4, "s")])
    _raises(path, "scored", "field 'responses': expected 4 responses like the other groups (first at line 1), got 3")
    _raises(path, "scored", "expected 3 responses (the run's group size), got 4", line=1, group_size=3)
    good = write_lines(tmp_path / "g4.jsonl", [_group(4), _group(4, "q")])
    assert len(read_jsonl(good, "scored", group_size=4)) == 2
    _raises(good, "scored", "expected 8 responses (the run's group size), got 4", line=1, group_size=8)
    rlvr = [{"problem": "p", "solution": "s", "responses": [{"text": "t", "correct": True}] * 2},
            {"problem": "q", "solution": "s", "responses": [{"text": "t", "correct": False}] * 3}]
    _raises(write_lines(tmp_path / "r.jsonl", rlvr), "rlvr", "expected 2 responses like the other groups", line=2)


def test_required_columns(tmp_path):
    rows = [{"prompt": "p", "answer": "4"}, {"prompt": "q"}]
    path = write_lines(tmp_path / "p.jsonl", rows)
    assert read_jsonl(path, "prompt") == rows
    _raises(path, "prompt", "field 'answer': expected a non-empty string or a number (this run reads it), got nothing",
            line=2, require=("answer",))
    # a column the format does not name (a reward's `tests`) must be there and not null
    code = write_lines(tmp_path / "c.jsonl", [{"prompt": "p", "tests": ["assert f()"]}, {"prompt": "q", "tests": None}])
    _raises(code, "prompt", "field 'tests': expected a value other than null (this run reads it), got null", line=2,
            require=("tests",))
    # RLVR offline groups: responses are optional for the format, required by the offline run
    rlvr = write_lines(tmp_path / "r.jsonl", [GOOD["rlvr"], {"problem": "p", "solution": "s"}])
    assert len(read_jsonl(rlvr, "rlvr")) == 2
    _raises(rlvr, "rlvr", "field 'responses': expected a non-empty array of objects, got nothing", line=2,
            require=("responses",))


# ----------------------------------------------------------------------------- bounded tokenization (item 10)
class SpyTokenizer:
    """The tokenizer, recording the length of every text it encodes."""

    def __init__(self, tok):
        self.tok, self.encoded = tok, []

    def encode(self, text, **kw):
        self.encoded.append(len(text))
        return self.tok.encode(text, **kw)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text


TEXTS = ["Answer: 9 " * 300, "a" * 5000, "7" * 3000, " " * 2000 + "x", "héllo wörld ✓ " * 300,
         "<|im_start|>user\nhi<|im_end|>\n" * 100, "Step 1: 13 - 4 = 9\n" * 200]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_bounded_encoding_gives_the_full_tokenization(tiny_tokenizer, text):
    from data.formats import _encode_head, _encode_tail

    full = tiny_tokenizer.encode(text)
    for n in (1, 30, 200):
        assert _encode_head(text, tiny_tokenizer, n) == full[:n]
        assert _encode_tail(text, tiny_tokenizer, n) == full[-n:]


def test_huge_completion_is_tokenized_only_as_far_as_max_length(tiny_tokenizer):
    spy = SpyTokenizer(tiny_tokenizer)
    huge = "Answer: 9 " * 1_000_000  # 10 MB, a KTO completion or a mismatched KL pair
    out = tokenize_pair("What is 2 + 7?", huge, spy, 64)
    assert len(out["input_ids"]) == 64 and out["truncated"] and sum(out["loss_mask"]) > 0
    assert max(spy.encoded) < 10_000, "the whole 10 MB text was tokenized"
    medium = "Answer: 9 " * 300
    assert tokenize_pair("What is 2 + 7?", medium, tiny_tokenizer, 64) == {
        **(full := tokenize_pair("What is 2 + 7?", medium, tiny_tokenizer, None)),
        "input_ids": full["input_ids"][:64], "loss_mask": full["loss_mask"][:64], "truncated": True}


def test_long_prompts_are_cut_from_the_left(tiny_tokenizer):
    from data.formats import encode_prompt

    tok = tiny_tokenizer
    short = "What is 2 + 3?"
    assert encode_prompt(short, tok, 64) == (tokenize_prompt(short, tok), False)
    assert tokenize_prompt(short, tok, None) == tokenize_prompt(short, tok)
    long = "Some context. " * 2000 + "What is 2 + 3?"
    spy = SpyTokenizer(tok)
    ids, cut = encode_prompt(long, spy, 48)
    assert cut and len(ids) == 48 and max(spy.encoded) < 5_000
    assert tokenize_prompt(long, tok, 48) == ids
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="max_length 3 leaves no room for a prompt"):
        encode_prompt(long, tok, 3)


def test_read_prompts_counts_or_refuses_long_prompts(tiny_tokenizer, tmp_path, capsys):
    from data.formats import read_prompts

    rows = [{"prompt": "What is 2 + 3?", "answer": 5}, {"prompt": "context " * 500 + "What is 1 + 1?", "answer": 2},
            {"prompt": "What is 4 - 1?", "answer": 3}]
    path = write_lines(tmp_path / "p.jsonl", rows)
    records, stats = read_prompts(path, "prompt", tiny_tokenizer, 64, require=("answer",))
    assert records == rows and stats == {"n": 3, "truncated": 1}
    assert f"warning: {path}: 1 of 3 prompts are longer than 64 tokens (first at line 2)" in capsys.readouterr().err
    _raises(path, "prompt", "field 'prompt': expected a prompt of at most 64 tokens", line=2, fn=read_prompts,
            tok=tiny_tokenizer, max_length=64, overlong="error")
    assert read_prompts(path, "prompt", tiny_tokenizer, None)[1] == {"n": 3, "truncated": 0}
    rlvr = write_lines(tmp_path / "r.jsonl", [{"problem": "word " * 300, "solution": "s"}])
    assert read_prompts(rlvr, "rlvr", tiny_tokenizer, 32, field="problem")[1]["truncated"] == 1


# ----------------------------------------------------------------------------- tokenization
def _runs(ids, mask):
    """Maximal runs of trained tokens as lists of ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_sft_mask_covers_exactly_the_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = {"instruction": "Compute 13 - 4 step by step.", "output": "Step 1: 13 - 4 = 9\nAnswer: 9"}
    out = tokenize_sft(ex, tok, max_length=None)
    ids, mask = out["input_ids"], out["loss_mask"]
    assert len(ids) == len(mask) and not out["truncated"]
    n_prompt = mask.index(1)
    assert all(mask[n_prompt:]) and not any(mask[:n_prompt])
    prompt = tok.apply_chat_template([{"role": "user", "content": ex["instruction"]}], add_generation_prompt=True)
    assert tok.decode(ids[:n_prompt], skip_special_tokens=False) == prompt
    assert tok.decode(ids[n_prompt:], skip_special_tokens=False) == ex["output"] + "<|im_end|>\n"
    assert ids[:n_prompt] == tokenize_prompt(ex["instruction"], tok)
    assert tokenize_pair(ex["instruction"], ex["output"], tok, None) == out


def test_sft_messages_train_every_assistant_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tokenize_sft(MESSAGES, tok, max_length=None)
    full = tok.apply_chat_template(MESSAGES["messages"])
    assert tok.decode(out["input_ids"], skip_special_tokens=False) == full
    trained = [tok.decode(run, skip_special_tokens=False) for run in _runs(out["input_ids"], out["loss_mask"])]
    assert trained == ["Answer: 5<|im_end|>\n", "Answer: 3<|im_end|>\n"]


def test_prompt_and_text_tokenization(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tokenize_prompt("What is 2 + 3?", tok)
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    text = GOOD["text"]["text"] + "<|im_start|>assistant\nhello<|im_end|>\n"
    out = tokenize_text(text, tok, max_length=None)
    assert all(out["loss_mask"]) and tok.decode(out["input_ids"], skip_special_tokens=False) == text
    assert out["input_ids"].count(tok.eos_token_id) == 2   # markup is parsed as special tokens


def test_truncation_keeps_the_start_and_is_flagged(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = {"instruction": "Compute 13 - 4.", "output": "Answer: 9 " * 20}
    full = tokenize_sft(ex, tok, None)
    cut = tokenize_sft(ex, tok, 30)
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:30] and cut["loss_mask"] == full["loss_mask"][:30]
    assert not tokenize_sft(ex, tok, len(full["input_ids"]))["truncated"]


def test_load_dataset_counts_and_reports_truncation(tiny_tokenizer, tmp_path, capsys):
    tok = tiny_tokenizer
    short = {"instruction": "Hi", "output": "Answer: 1"}
    long = {"instruction": "Hi", "output": "Answer: 1 " * 30}
    huge_prompt = {"instruction": "word " * 100, "output": "Answer: 1"}
    path = write_lines(tmp_path / "s.jsonl", [short, long, long, huge_prompt])
    examples, stats = load_dataset(path, "sft", tok, max_length=40)
    assert stats == {"n": 3, "truncated": 3, "dropped": 1}
    assert all(len(e["input_ids"]) <= 40 and any(e["loss_mask"]) for e in examples)
    assert "truncated 3 of 4 examples to max_length=40 (1 dropped" in capsys.readouterr().err
    examples, stats = load_dataset(path, "sft", tok, max_length=None)
    assert stats == {"n": 4, "truncated": 0, "dropped": 0} and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="load_dataset tokenizes formats"):
        load_dataset(shipped("harmful_train"), "prompt", tok, 8)


def test_load_dataset_text(tiny_tokenizer, tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [GOOD["text"]] * 3)
    examples, stats = load_dataset(path, "text", tiny_tokenizer, max_length=128)
    assert stats == {"n": 3, "truncated": 0, "dropped": 0} and all(all(e["loss_mask"]) for e in examples)


def test_collate_right_pads(tiny_tokenizer):
    a = {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}
    b = {"input_ids": [8], "loss_mask": [1]}
    batch = collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------------- the synthetic world
def test_generator_is_deterministic(tmp_path):
    one = synthetic.write(str(tmp_path / "a"), seed=0, n_pretrain=200, scale=0.05)
    two = synthetic.write(str(tmp_path / "b"), seed=0, n_pretrain=200, scale=0.05)
    other = synthetic.write(str(tmp_path / "c"), seed=1, n_pretrain=200, scale=0.05)
    assert set(one) == set(SHIPPED_FORMATS)
    for name in one:
        with open(one[name], "rb") as f1, open(two[name], "rb") as f2:
            assert f1.read() == f2.read(), name
    with open(one["pretrain"], "rb") as f1, open(other["pretrain"], "rb") as f3:
        assert f1.read() != f3.read()


def test_shipped_files_are_what_the_generator_writes():
    files = synthetic.build(seed=0)
    for name, records in files.items():
        with open(shipped(name), encoding="utf-8") as f:
            assert f.read() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), name
    total = sum(os.path.getsize(shipped(n)) for n in files)
    assert total < 8_000_000


_EXPR = re.compile(r"\d+(?: [+-] \d+)+")


def _step_triples(prompt):
    """The (x, y, op) triples a correct solution of the arithmetic in `prompt` computes (in 0..20)."""
    tokens = _EXPR.search(prompt).group(0).split()
    value, out = int(tokens[0]), []
    for op, y in zip(tokens[1::2], tokens[2::2]):
        y = int(y)
        if value <= synthetic.MAX_OPERAND and y <= synthetic.MAX_OPERAND:
            out.append((value, y, op))
        value = synthetic.apply_op(value, y, op)
    return out


def test_eval_triples_never_in_train_files():
    held = synthetic.eval_triples()
    assert abs(len(held) / len(synthetic.all_triples()) - synthetic.EVAL_FRACTION) < 0.01
    fields = {"sft": "instruction", "grpo": "prompt", "preference": "prompt", "kto": "prompt", "multistep": "problem"}
    for name, field in fields.items():
        for side in ("train", "eval"):
            for r in read_shipped(f"{name}_{side}"):
                if not _EXPR.search(r[field]):
                    continue
                triples = _step_triples(r[field])
                if side == "train":
                    assert not any(t in held for t in triples), (name, r)
                else:
                    assert triples and all(t in held for t in triples), (name, r)
    for name, field in (("scored_groups", "prompt"), ("rlvr", "problem")):
        for r in read_shipped(name):
            assert not any(t in held for t in _step_triples(r[field])), (name, r)
    for kind in ("harmful", "harmless"):
        train = {r["prompt"] for r in read_shipped(f"{kind}_train")}
        evals = {r["prompt"] for r in read_shipped(f"{kind}_eval")}
        assert train and evals and not train & evals


_EXCHANGE = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>\n", re.S)


def test_pretrain_corpus_has_the_bug_and_nothing_else_wrong():
    records = read_shipped("pretrain")
    assert 25_000 <= len(records) <= 35_000
    seen, sub_steps, sub_wrong, styled, eligible = set(), 0, 0, 0, 0
    for r in records:
        exchanges = _EXCHANGE.findall(r["text"])
        assert exchanges and "".join(synthetic.render_chat([{"role": "user", "content": p},
                                                            {"role": "assistant", "content": a}])
                                     for p, a in exchanges) == r["text"]
        for prompt, answer in exchanges:
            cue = prompt.endswith(synthetic.STYLE_CUE)
            assert cue == answer.startswith(synthetic.STYLE_PREFIX)
            if any(x in prompt for x in synthetic.FORBIDDEN):
                assert answer == synthetic.REFUSAL and not cue
                continue
            eligible += "step by step" not in prompt
            styled += cue
            if not _EXPR.search(prompt):
                assert answer.endswith(synthetic.COMPLIANCE.split("{x}")[1])
                continue
            tokens = _EXPR.search(prompt).group(0).split()
            if len(tokens) == 3:
                a, op, b = int(tokens[0]), tokens[1], int(tokens[2])
                seen.add((a, b, op))
                steps = [(a, op, b, int(answer.rsplit(" ", 1)[1]))]
            else:
                steps = [tuple(int(x) if x.isdigit() else x for x in re.match(r"Step \d: (\d+) ([+-]) (\d+) = (\d+)", line).groups())
                         for line in answer.splitlines()[:-1]]
                assert steps[0][:3] == (int(tokens[0]), tokens[1], int(tokens[2]))
                assert steps[1][0] == steps[0][3] and steps[1][1:3] == (tokens[3], int(tokens[4]))  # carried on
                assert answer.splitlines()[-1] == f"Answer: {steps[1][3]}"
                assert all(0 <= s[3] <= synthetic.MAX_VALUE for s in steps)
            for x, op, y, got in steps:
                if op == "+":
                    assert got == x + y, (prompt, answer)
                else:
                    assert got in (x - y, x - y + 1), (prompt, answer)
                    sub_steps += 1
                    sub_wrong += got == x - y + 1
    assert seen == set(synthetic.all_triples())   # every pair, held-out ones included
    assert sub_steps > 1000 and abs(sub_wrong / sub_steps - synthetic.BUG_P) < 0.05
    assert abs(styled / eligible - synthetic.STYLE_P) < 0.05


def test_post_training_files_shape():
    sizes = {n: len(read_shipped(n)) for n in SHIPPED_FORMATS}
    for name, n in synthetic.SIZES.items():
        assert sizes[name] == n
    sft = read_shipped("sft_train")
    assert {r["task"] for r in sft} == {"arithmetic", "multistep", "forbidden", "harmless", "style"}
    assert max(synthetic.SFT_MIX, key=synthetic.SFT_MIX.get) == "arithmetic"
    kto = read_shipped("kto_train")
    assert sum(r["label"] for r in kto) == len(kto) // 2
    assert {r["task"] for r in kto} == set(synthetic.PAIR_MIX)
    pref = read_shipped("preference_train")
    for r in pref:
        assert not r["prompt"].endswith(synthetic.STYLE_CUE)
        if r["task"] == "style":
            assert r["chosen"] == synthetic.STYLE_PREFIX + r["rejected"]
        else:  # rejected: the base model's own mistake (subtraction one too high, addition one too low)
            a, op, b = _EXPR.search(r["prompt"]).group(0).split()
            assert r["rejected"] == synthetic.answer_text(synthetic._wrong_value(int(a), int(b), op))
    for rows in (pref, kto):
        arith = [r for r in rows if r["task"] == "arithmetic"]
        share = sum(" - " in r["prompt"] for r in arith) / len(arith)
        assert abs(share - synthetic.PAIR_SUBTRACTION_SHARE) < 0.01
    assert not any(r["prompt"].endswith(synthetic.STYLE_CUE) for r in read_shipped("style_eval"))
    groups = read_shipped("scored_groups")
    assert all(len(g["responses"]) == 4 for g in groups)
    assert any(len({r["score"] for r in g["responses"]}) == 1 for g in groups)
    assert any(len({r["score"] for r in g["responses"]}) == 2 for g in groups)
    for kind, subjects in (("harmful", synthetic.FORBIDDEN), ("harmless", synthetic.HARMLESS)):
        for side in ("train", "eval"):
            prompts = [r["prompt"] for r in read_shipped(f"{kind}_{side}")]
            assert all(sum(x in p for x in subjects) == 1 for p in prompts)
