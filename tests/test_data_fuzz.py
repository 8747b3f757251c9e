"""Fuzz the data readers: many malformed lines in every format, each either a valid record (the
mutation happened to keep it valid: it must then tokenize) or a one-line DataError that names the
file and the line; never another exception. data.validate must agree line by line and report every
bad line of one file in one pass. Deterministic (seed 0) and quick (a few seconds)."""
import json
import os
import random

import pytest

from data.formats import (DataError, read_jsonl, tokenize_pair, tokenize_prompt, tokenize_sft, tokenize_text)
from data.validate import validate_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
CASES = 400  # per format

GOOD = {
    "text": {"text": "<|im_start|>user\nhi<|im_end|>\n"},
    "sft": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                         {"role": "assistant", "content": "Answer: 5"}]},
    "preference": {"prompt": "What is 2 + 3?", "chosen": "Answer: 5", "rejected": "Answer: 6"},
    "kto": {"prompt": "What is 2 + 3?", "completion": "Answer: 5", "label": True},
    "prompt": {"prompt": "What is 2 + 3?", "answer": "5"},
    "scored": {"prompt": "p", "responses": [{"text": "Answer: 5", "score": 1.0}, {"text": "Answer: 6", "score": 0}]},
    "rlvr": {"problem": "p", "solution": "s", "responses": [{"text": "t", "correct": False},
                                                             {"text": "u", "correct": True}]},
}
GOOD["sft_plain"] = {"instruction": "What is 2 + 3?", "output": "Answer: 5"}

# JSON text (valid or not) a value may be replaced with
WEIRD = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "-" + "9" * 1200, "9" * 400, "1.5e308",
         r'"x\ud800"', r'"\udc00y"', r'"\ud83d\ude00"', r'"\u0000"', r'"\u001b[31m"', '""', '"   "', '"\\n\\t"',
         "null", "true", "false", "0", "1", "-0", "0.5", '"true"', '"false"', '"1"', '"0.5"', "[]", "{}", "[1, 2]",
         '{"a": 1}', '{"a": 1, "a": 2}', "[" * 50 + "]" * 50, "[" * 3000 + "]" * 3000, '"' + "a" * 50_000 + '"',
         '"<|im_start|>assistant\\n"', '"\u2028\u2029"', '"\ufeff"', '"é✓😀"', '"\\ud800\\ud800"',
         '{"role": "assistant", "content": "x"}', '[{"role": "user"}]', '[{"role": "assistant", "content": 5}]',
         '[{"text": "a", "score": 1}]', '[{"text": 1, "score": "a"}]', '[{"text": "a", "correct": "yes"}]',
         '[{"text": "a", "score": 1}, {"text": "b", "score": 2}, {"text": "c", "score": 3}]', "[null]", '["a"]',
         '[{"text": "a", "score": true}]', "1" * 20, "-", "01", "1.", ".5", "'single'", "undefined", "}"]
NOISE = [b"\xff", b"\xfe\xff", b"\x00", b"\r", b"\x1b", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\xc0\xaf", b"\\", b'"',
         b"{", b"}", b"[", b",", b":", b"\t", b"\xe2\x80\xa8", b"\x7f", b"\xf4\x90\x80\x80"]


class Raw:
    """JSON text written as is."""

    def __init__(self, text):
        self.text = text


class Twice(dict):
    """An object written with `key` twice."""

    def __init__(self, d, key):
        super().__init__(d)
        self.key = key


def dumps(v) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        items = list(v.items())
        if isinstance(v, Twice):
            items.insert(0, (v.key, v[v.key]))  # the same value twice: still a duplicate key
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(x)}" for k, x in items) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


def containers(v, out=None):
    """Every (container, key or index) in a JSON value."""
    out = [] if out is None else out
    if isinstance(v, dict):
        for k in list(v):
            out.append((v, k))
            containers(v[k], out)
    elif isinstance(v, list):
        for i in range(len(v)):
            out.append((v, i))
            containers(v[i], out)
    return out


def mutate(rng, good: dict) -> bytes:
    record = json.loads(json.dumps(good))  # a copy
    spots = containers(record)
    kind = rng.randrange(8)
    if kind == 0:  # a value replaced by a weird one
        c, k = rng.choice(spots)
        c[k] = Raw(rng.choice(WEIRD))
    elif kind == 1:  # a key or an item deleted
        c, k = rng.choice(spots)
        del c[k]
    elif kind == 2:  # a key written twice
        objects = [record] + [c[k] for c, k in spots if isinstance(c[k], dict)]
        target = rng.choice(objects)
        if target:
            twice = Twice(target, rng.choice(list(target)))
            if target is record:
                record = twice
            else:
                c, k = next((c, k) for c, k in spots if c[k] is target)
                c[k] = twice
    elif kind == 3:  # an unknown field, weird or not
        record[rng.choice(["task", "extra", "meta", "\u00e9", ""])] = Raw(rng.choice(WEIRD))
    elif kind == 4:  # the whole line replaced
        return rng.choice(WEIRD).encode("utf-8", "surrogatepass")
    line = dumps(record).encode("utf-8", "surrogatepass")
    if kind == 5:  # cut short
        return line[:rng.randrange(len(line))]
    if kind == 6:  # noise bytes inserted
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(line) + 1)
            line = line[:i] + rng.choice(NOISE) + line[i:]
    if kind == 7:  # a byte changed
        i = rng.randrange(len(line))
        line = line[:i] + bytes([rng.randrange(256)]) + line[i + 1:]
    return line.replace(b"\n", b" ")  # one line


@pytest.fixture(scope="module")
def tok():
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(os.path.join(REPO, "assets", "tiny-qwen3"))


def tokenize(record, fmt, tok):
    """What training does with a record that passed: every text of it tokenizes."""
    if fmt == "sft":
        return tokenize_sft(record, tok, 64)
    if fmt == "text":
        return tokenize_text(record["text"], tok, 64)
    prompt = record.get("prompt", record.get("problem"))
    tokenize_prompt(prompt, tok, 64)
    texts = [record[k] for k in ("chosen", "rejected", "completion", "solution") if k in record]
    texts += [r["text"] for r in record.get("responses", [])]
    for t in texts:
        tokenize_pair(prompt, t, tok, 64)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_malformed_lines_give_a_data_error_and_nothing_else(tmp_path, tok, name):
    fmt = "sft" if name == "sft_plain" else name
    rng = random.Random(f"{SEED}-{name}")
    good = json.dumps(GOOD[name]).encode()
    rejected, lines = [], []
    for case in range(CASES):
        line = mutate(rng, GOOD[name])
        lines.append(line)
        path = tmp_path / f"case{case}.jsonl"
        path.write_bytes(good + b"\n" + line + b"\n")
        path = str(path)
        try:
            records = read_jsonl(path, fmt)
        except DataError as e:  # any other exception fails the test with its traceback
            message = str(e)
            assert message.startswith(f"{path}:2: "), (line[:200], message)
            assert len(message.splitlines()) == 1 and message.isprintable(), (line[:200], message)
            assert len(message) < 600, message
            rejected.append(case)
        else:
            for r in records:
                tokenize(r, fmt, tok)
        report = validate_file(path, fmt, tok if case % 5 == 0 else None, max_length=64)
        assert not [e for e in report["errors"] if e["kind"] in ("internal", "tokenize")], report["errors"]
        assert [e["line"] for e in report["errors"]] == ([2] if rejected[-1:] == [case] else []), (line[:200], report)
        assert all(e["message"].startswith(f"{path}:2: ") and e["message"].isprintable() for e in report["errors"])
    assert 0.5 * CASES < len(rejected) < CASES  # the fuzzing makes bad lines, and some mutations stay valid
    # one file with every case: one pass reports each line rejected on its own (group sizes aside)
    path = tmp_path / "all.jsonl"
    path.write_bytes(good + b"\n" + b"\n".join(lines) + b"\n")
    report = validate_file(str(path), fmt, None, max_length=64)
    missing = {case + 2 for case in rejected} - {e["line"] for e in report["errors"]}
    assert not missing, sorted(missing)
