"""data/validate.py: every planted defect is found with its line number, and the statistics are right."""
import json
import os
import subprocess
import sys

import pytest

from data.validate import format_report, resolve_format, validate_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(os.path.join(REPO, "assets", "tiny-qwen3"))


def write_lines(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return str(path)


GOOD = {"prompt": "What is 2 + 3?", "chosen": "Answer: 5", "rejected": "Answer: 6"}
PLANTED_DPO = [
    GOOD,                                                                   # 1 fine
    '{"prompt": "What is 1 + 1?", "chosen": "Answer: 2", "rejected": ',      # 2 bad JSON
    {"prompt": "What is 4 + 4?", "chosen": "Answer: 8"},                    # 3 missing field 'rejected'
    GOOD,                                                                   # 4 duplicate of line 1
    {"prompt": "What is 7 - 2?", "chosen": "Answer: 5", "rejected": "Answer: 5"},  # 5 identical pair
    {"prompt": "Explain tea.", "chosen": "Tea is brewed. " * 40, "rejected": "No."},  # 6 overlong
    "",                                                                      # 7 blank: skipped, not an error
    {"prompt": "What is 9 + 1?", "chosen": "", "rejected": "Answer: 10"},   # 8 empty chosen
    [1, 2, 3],                                                               # 9 not an object
    {"prompt": "What is 3 + 3?", "chosen": "Answer: 6", "rejected": 7},      # 10 wrong type
]


def by_kind(items):
    out = {}
    for i in items:
        out.setdefault(i["kind"], []).append(i["line"])
    return out


def test_every_planted_defect_is_found_with_its_line_number(tmp_path, tok):
    path = write_lines(tmp_path / "planted.jsonl", PLANTED_DPO)
    report = validate_file(path, "dpo", tok, max_length=64)
    errors = {e["line"]: e["message"] for e in report["errors"]}
    assert sorted(errors) == [2, 3, 8, 9, 10]  # all of them, not just the first
    assert errors[2].startswith(f"{path}:2: expected a JSON object, got invalid JSON")
    assert errors[3] == f"{path}:3: field 'rejected': expected a non-empty string, got nothing (field missing)"
    assert f"{path}:8: field 'chosen'" in errors[8] and "empty string" in errors[8]
    assert f"{path}:9: expected a JSON object, got array" in errors[9]
    assert f"{path}:10: field 'rejected'" in errors[10]
    warnings = by_kind(report["warnings"])
    assert warnings["duplicate"] == [4]
    assert "duplicate of line 1" in next(w["message"] for w in report["warnings"] if w["kind"] == "duplicate")
    assert warnings["identical_pair"] == [5]
    assert warnings["overlong"] == [6]
    s = report["stats"]
    assert (s["lines"], s["blank_lines"], s["records"], s["invalid"]) == (10, 1, 4, 5)
    assert s["duplicates"] == 1 and s["identical_pairs"] == 1
    assert s["tokens"]["over_max_length"] == 1 and s["tokens"]["truncated_share"] == 0.25
    assert s["tokens"]["length"]["max"] > 64 >= s["tokens"]["length"]["p50"]
    text = format_report(report)
    for line in (2, 3, 4, 5, 6, 8, 9, 10):
        assert f"{path}:{line}:" in text
    assert "FAILED: 5 invalid lines" in text


def test_cli_exit_codes_and_messages(tmp_path, capsys):
    from data.validate import main

    bad = write_lines(tmp_path / "bad.jsonl", PLANTED_DPO)
    good = write_lines(tmp_path / "good.jsonl", [GOOD, {**GOOD, "prompt": "What is 2 + 4?"}])
    # the real command line once
    out = subprocess.run([sys.executable, "-m", "data.validate", bad, "--format", "dpo", "--max-length", "64"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"{bad}:2:" in out.stdout and f"{bad}:6:" in out.stdout and "Traceback" not in out.stderr

    def run(*args):
        rc = main(list(args))
        return rc, *capsys.readouterr()

    rc, stdout, _ = run(good, "--format", "orpo", "--json")
    assert rc == 0
    report = json.loads(stdout)
    assert report["format"] == "preference" and report["stats"]["records"] == 2
    assert run(good, "--format", "nope")[0] == 1
    rc, _, stderr = run(str(tmp_path / "missing.jsonl"), "--format", "sft")
    assert rc == 1 and "data file not found" in stderr
    rc, _, stderr = run(good, "--format", "dpo", "--model", str(tmp_path / "no-model"))
    assert rc == 1 and "no-model" in stderr
    # a duplicate is a warning: exit 0, unless --strict
    dup = write_lines(tmp_path / "dup.jsonl", [GOOD, GOOD])
    assert run(dup, "--format", "dpo", "--model", "none")[0] == 0
    assert run(dup, "--format", "dpo", "--model", "none", "--strict")[0] == 1


def test_format_aliases():
    assert {resolve_format(n) for n in ("dpo", "preference", "orpo", "cpo", "simpo")} == {"preference"}
    assert resolve_format("grpo") == resolve_format("prompt") == "prompt"
    assert resolve_format("KTO") == "kto" and resolve_format("pretrain") == "text"
    with pytest.raises(ValueError, match="unknown format"):
        resolve_format("ppo")


def test_kto_label_balance(tmp_path, tok):
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"Answer: {i + 1}", "label": i % 4 != 0} for i in range(8)]
    report = validate_file(write_lines(tmp_path / "kto.jsonl", rows), "kto", tok)
    labels = report["stats"]["labels"]
    assert (labels["desirable"], labels["undesirable"], labels["desirable_share"]) == (6, 2, 0.75)
    assert labels["suggested_desirable_weight"] == [round(2 / 6, 3), round(4 / 3 * 2 / 6, 3)]
    one_sided = validate_file(write_lines(tmp_path / "kto1.jsonl", [{**rows[1], "label": True}]), "kto", None)
    assert [w["kind"] for w in one_sided["warnings"]] == ["label_balance"]


def test_scored_groups_reward_spread(tmp_path):
    rows = [{"prompt": "a", "responses": [{"text": "x", "score": 1.0}, {"text": "y", "score": 0.0}]},
            {"prompt": "b", "responses": [{"text": "x", "score": 0.5}, {"text": "y", "score": 0.5}]},
            {"prompt": "c", "responses": [{"text": t, "score": 0.0} for t in "xy"]},
            {"prompt": "d", "responses": [{"text": "x", "score": "high"}]}]
    report = validate_file(write_lines(tmp_path / "scored.jsonl", rows), "scored", None)
    assert [e["line"] for e in report["errors"]] == [4]
    assert "responses[0].score" in report["errors"][0]["message"]
    g = report["stats"]["groups"]
    assert (g["n"], g["tied_groups"], g["tied_lines"]) == (3, 2, [2, 3])
    assert g["tied_share"] == round(2 / 3, 4) and g["size"]["min"] == g["size"]["max"] == 2
    rlvr = [{"problem": "p", "solution": "s", "responses": [{"text": t, "correct": True} for t in "tu"]},
            {"problem": "q", "solution": "s"}]
    g = validate_file(write_lines(tmp_path / "rlvr.jsonl", rlvr), "rlvr", None)["stats"]["groups"]
    assert (g["n"], g["without_responses"], g["tied_groups"]) == (1, 1, 1)


def test_sft_lengths_match_training_tokenization(tmp_path, tok):
    from data.formats import tokenize_sft

    rows = [{"instruction": "What is 2 + 2?", "output": "Answer: 4"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]},
            {"messages": [{"role": "user", "content": "Hi"}]}]
    report = validate_file(write_lines(tmp_path / "sft.jsonl", rows), "sft", tok, max_length=256)
    assert [e["line"] for e in report["errors"]] == [3] and "assistant" in report["errors"][0]["message"]
    lengths = sorted(len(tokenize_sft(r, tok, None)["input_ids"]) for r in rows[:2])
    t = report["stats"]["tokens"]["length"]
    assert (t["min"], t["max"], t["n"]) == (lengths[0], lengths[1], 2)
    assert report["stats"]["styles"] == {"messages": 1, "instruction_output": 1}


def test_shipped_data_is_clean(tok):
    report = validate_file(os.path.join(REPO, "data", "synthetic", "kto_eval.jsonl"), "kto", tok)
    assert report["errors"] == [] and report["stats"]["records"] == 200


def test_invalid_utf8_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    report = validate_file(str(path), "text", None)
    assert [(e["line"], e["kind"]) for e in report["errors"]] == [(2, "encoding")]


# ----------------------------------------------------------------------------- one pass over every kind of bad line
def write_raw(path, lines):
    """Raw text lines, written as given (for what json.dumps would never write)."""
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode("utf-8", "surrogatepass")) + b"\n"
                              for l in lines))
    return str(path)


def _group(n, prompt):
    return json.dumps({"prompt": prompt, "responses": [{"text": f"t{i}", "score": i % 2} for i in range(n)]})


BAD_SCORED = [
    _group(4, "a"),                                                                 # 1 fine
    '{"prompt": "b", "responses": ' + "[" * 100_000 + "]" * 100_000 + "}",          # 2 RecursionError before
    r'{"prompt": "c\ud800", "responses": [{"text": "x", "score": 1}]}',             # 3 lone surrogate
    '{"prompt": "d", "responses": [{"text": "x", "score": ' + "9" * 5000 + "}]}",   # 4 5000-digit integer
    '{"prompt": "e", "prompt": "e2", "responses": [{"text": "x", "score": 1}]}',     # 5 duplicate key
    '{"prompt": "f", "responses": [{"text": "x", "score": NaN}]}',                  # 6 NaN literal
    _group(3, "g"),                                                                 # 7 another group size
    b'{"prompt": "h\xff"}',                                                         # 8 invalid UTF-8
    _group(4, "i"),                                                                 # 9 fine
    '{"prompt": "j", "responses": [{"text": "x", "score": "1"}, {"text": "y", "score": true}]}',  # 10 strings/bools
]


def test_every_bad_line_is_reported_in_one_pass(tmp_path, tok):
    path = write_raw(tmp_path / "bad.jsonl", BAD_SCORED)
    report = validate_file(path, "scored", tok, max_length=64)
    errors = {e["line"]: e for e in report["errors"]}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 10]
    assert {ln: e["kind"] for ln, e in errors.items()} == {2: "json", 3: "schema", 4: "schema", 5: "schema",
                                                          6: "schema", 7: "group_size", 8: "encoding", 10: "schema"}
    assert "nested at most" in errors[2]["message"]
    assert "field 'prompt': expected Unicode text" in errors[3]["message"]
    assert "field 'responses[0].score': expected an integer of at most 1000 digits" in errors[4]["message"]
    assert "field 'prompt': expected each key once" in errors[5]["message"]
    assert "got NaN" in errors[6]["message"]
    assert "expected 4 responses like the other groups (first at line 1), got 3" in errors[7]["message"]
    for ln, e in errors.items():
        assert e["message"].startswith(f"{path}:{ln}: ") and e["message"].isprintable(), e
    assert (report["stats"]["records"], report["stats"]["invalid"]) == (2, 8)
    text = format_report(report, max_shown=0)
    assert text.splitlines()[-1] == f"FAILED: 8 invalid lines (2 good records of 10 lines, 0 warnings): {path}"
    assert all(line.isprintable() for line in text.splitlines())


def test_cli_reports_every_bad_line_and_ends_with_the_verdict(tmp_path, capsys):
    from data.validate import main

    path = write_raw(tmp_path / "bad.jsonl", BAD_SCORED)
    out = subprocess.run([sys.executable, "-m", "data.validate", path, "--format", "scored", "--max-length", "64"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    for line in (2, 3, 4, 5, 6, 7, 8, 10):
        assert f"{path}:{line}:" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("FAILED: 8 invalid lines")
    assert main([path, "--format", "scored", "--model", "none", "--json"]) == 1
    stdout, stderr = capsys.readouterr()
    assert len(json.loads(stdout)["errors"]) == 8  # stdout stays pure JSON, the verdict goes to stderr
    assert stderr.splitlines()[-1].startswith("FAILED: 8 invalid lines")


def test_cli_file_errors_and_required_columns(tmp_path, capsys):
    from data.validate import main

    rc = main([str(tmp_path), "--format", "sft", "--model", "none"])
    assert rc == 1 and "expected a JSONL file, got a directory" in capsys.readouterr().err
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b"}])
    assert main([prompts, "--format", "grpo", "--model", "none"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"OK: 2 good records of 2 lines, 0 warnings: {prompts}"
    assert main([prompts, "--format", "grpo", "--model", "none", "--require", "answer"]) == 1
    assert f"{prompts}:2: field 'answer'" in capsys.readouterr().out
    groups = write_lines(tmp_path / "g.jsonl", [json.loads(_group(4, "a")), json.loads(_group(4, "b"))])
    assert main([groups, "--format", "scored", "--model", "none", "--group-size", "4"]) == 0
    assert main([groups, "--format", "scored", "--model", "none", "--group-size", "8"]) == 1
    assert "expected 8 responses (the run's group size), got 4" in capsys.readouterr().out


def test_a_check_that_breaks_costs_only_its_line(tmp_path, monkeypatch):
    import data.validate as validate_module

    real = validate_module.validate

    def flaky(obj, fmt, where, require=()):
        if obj.get("prompt") == "boom":
            raise KeyError("a bug in a check")
        return real(obj, fmt, where, require)

    monkeypatch.setattr(validate_module, "validate", flaky)
    path = write_lines(tmp_path / "d.jsonl", [GOOD, {**GOOD, "prompt": "boom"}, {"prompt": "p"}])
    report = validate_file(path, "dpo", None)
    assert [(e["line"], e["kind"]) for e in report["errors"]] == [(2, "internal"), (3, "schema")]
    assert "could not check this line (KeyError" in report["errors"][0]["message"]


def test_huge_lines_are_measured_up_to_a_cap(tmp_path, tok):
    huge = {"prompt": "What is 2 + 3?", "chosen": "Answer: 5 " * 1_000_000, "rejected": "Answer: 6"}  # 10 MB
    report = validate_file(write_lines(tmp_path / "huge.jsonl", [GOOD, huge]), "dpo", tok, max_length=64)
    assert report["errors"] == [] and report["stats"]["tokens"]["counted_up_to"] == 1024
    overlong = [w for w in report["warnings"] if w["kind"] == "overlong"]
    assert [w["line"] for w in overlong] == [2] and "is more than 1024 tokens" in overlong[0]["message"]
    assert report["stats"]["tokens"]["length"]["max"] == 1024 and report["stats"]["tokens"]["longer_than_counted"] == 1
    assert "(counted up to 1024: 1 records are longer)" in format_report(report)
