"""Check a training file before training on it: `python -m data.validate FILE --format dpo`.

Training stops at the first bad line (data.formats.read_jsonl: never half a result). Before a run
one wants the opposite: every problem in the file at once, and the numbers that decide whether the
run is worth starting. So this reads the whole file, checks each line with the same per-record
`validate` that training uses (the messages are the same), keeps going, and then reports:

  errors (exit code 1)  invalid UTF-8, invalid JSON (NaN/Infinity, a key twice, lone surrogates,
                        nesting or integers past the limits included), a record that is not of the
                        format (missing or empty field, wrong type, a scored/RLVR group of another
                        size than the others), with its line number
  warnings              exact duplicates ("duplicate of line N"), identical chosen/rejected pairs,
                        examples longer than --max-length tokens (they would be truncated; dropped when
                        the prompt alone fills it), groups whose scores all tie
  statistics            counts, duplicates, length distribution in tokens (chat template applied, as
                        training tokenizes) and the share that would be truncated, chosen/rejected
                        lengths, KTO label balance, reward spread of scored / RLVR groups

Formats are named as users know them: sft; dpo, preference, orpo, cpo, simpo, ipo; kto; grpo, prompt,
dapo; scored; rlvr; text, pretrain. `--json` prints the report as JSON; `--strict` makes warnings fail;
`--require answer` demands a column the run reads. The last line is always the verdict (on stderr
with --json). No line stops the report: a check that breaks on a line is reported as that line's
error (kind `internal`, a bug to report), and token lengths are counted up to LENGTH_CAP x
max_length, so a 10 MB line costs what a long one does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections import Counter

from data.formats import (BLANK, FORMATS, DataError, encode_prompt, group_size_errors, one_line, parse_line, read_lines,
                          shown_path, tokenize_pair, tokenize_sft, tokenize_text, validate)

ALIASES = {
    "sft": "sft",
    "dpo": "preference", "preference": "preference", "orpo": "preference", "cpo": "preference",
    "simpo": "preference", "ipo": "preference", "pairs": "preference",
    "kto": "kto",
    "grpo": "prompt", "prompt": "prompt", "dapo": "prompt", "dr_grpo": "prompt", "rl": "prompt",
    "scored": "scored",
    "rlvr": "rlvr",
    "text": "text", "pretrain": "text",
}
DEFAULT_MODEL = "assets/tiny-qwen3"
LENGTH_CAP = 8  # token lengths are counted up to this many times max_length (at least 1024)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_format(name: str) -> str:
    fmt = ALIASES.get(name.lower())
    if fmt is None:
        raise ValueError(f"unknown format {name!r}; expected one of {', '.join(sorted(ALIASES))}")
    return fmt


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def q(p):
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"n": len(s), "min": s[0], "mean": round(sum(s) / len(s), 2), "p50": q(0.5), "p90": q(0.9),
            "p99": q(0.99), "max": s[-1]}


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _lengths(obj: dict, fmt: str, tok, cap: int | None = None) -> tuple[int, int, list[int], bool]:
    """(tokens of the longest sequence this record becomes, tokens of its prompt part, each sequence's
    tokens, whether a length reached `cap` and was counted no further)."""
    if fmt == "sft":
        ex = tokenize_sft(obj, tok, cap)
        first = ex["loss_mask"].index(1) if 1 in ex["loss_mask"] else len(ex["input_ids"])
        return len(ex["input_ids"]), first, [len(ex["input_ids"])], ex["truncated"]
    if fmt == "text":
        ex = tokenize_text(obj["text"], tok, cap)
        return len(ex["input_ids"]), 0, [len(ex["input_ids"])], ex["truncated"]
    if fmt == "prompt":
        ids, capped = encode_prompt(obj["prompt"], tok, cap)
        return len(ids), len(ids), [len(ids)], capped
    prompt = obj.get("prompt", obj.get("problem"))
    if fmt == "preference":
        completions = [obj["chosen"], obj["rejected"]]
    elif fmt == "kto":
        completions = [obj["completion"]]
    elif fmt == "scored":
        completions = [r["text"] for r in obj["responses"]]
    else:  # rlvr
        completions = [obj["solution"]] + [r["text"] for r in obj.get("responses", [])]
    seqs = [tokenize_pair(prompt, c, tok, cap) for c in completions]
    longest = max(seqs, key=lambda e: len(e["input_ids"]))
    plen = longest["loss_mask"].index(1) if 1 in longest["loss_mask"] else len(longest["input_ids"])
    return len(longest["input_ids"]), plen, [len(e["input_ids"]) for e in seqs], any(e["truncated"] for e in seqs)


def validate_file(path: str, fmt: str, tok=None, max_length: int | None = 256, require=(),
                  group_size: int | None = None) -> dict:
    """The whole report for one file: {"path", "format", "errors", "warnings", "stats"}.

    errors/warnings are lists of {"line", "kind", "message"}; every line is checked (nothing stops at
    the first problem). `tok=None` skips the token-length statistics. `require` and `group_size` as
    in data.formats.read_jsonl. A file that cannot be read at all (missing, a directory, a FIFO, no
    permission) raises FileNotFoundError or DataError.
    """
    fmt = resolve_format(fmt) if fmt not in FORMATS else fmt
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    shown = shown_path(path)
    errors, warnings, records = [], [], []  # records: (lineno, obj)
    lines = blank = 0
    for lineno, raw in read_lines(path):
        lines, where = lineno, f"{shown}:{lineno}"
        try:
            obj = parse_line(raw, where, first=lineno == 1)
            if obj is BLANK:
                blank += 1
                continue
            validate(obj, fmt, where, require)
        except DataError as e:
            errors.append({"line": lineno, "kind": e.kind, "message": str(e)})
            continue
        except Exception as e:  # a check that broke is a bug, but it must not cost the rest of the report
            errors.append({"line": lineno, "kind": "internal",
                           "message": one_line(f"{where}: could not check this line ({type(e).__name__}: {e})")})
            continue
        records.append((lineno, obj))
    odd = {e.line: e for e in group_size_errors([o for _, o in records], [ln for ln, _ in records], path, fmt,
                                                   group_size)}
    if odd:
        errors += [{"line": ln, "kind": e.kind, "message": str(e)} for ln, e in odd.items()]
        records = [(ln, o) for ln, o in records if ln not in odd]
        errors.sort(key=lambda e: e["line"])

    stats = {"lines": lines, "blank_lines": blank, "records": len(records), "invalid": len(errors)}
    if not records and not errors:
        errors.append({"line": None, "kind": "empty",
                       "message": f"{shown}: expected at least one JSON line of format {fmt!r}, got an empty file"})

    # duplicates: the same record twice (canonical JSON), and prompts seen before
    first_seen, dups = {}, 0
    for lineno, obj in records:
        key = hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in first_seen:
            dups += 1
            warnings.append({"line": lineno, "kind": "duplicate",
                             "message": f"{shown}:{lineno}: duplicate of line {first_seen[key]}"})
        else:
            first_seen[key] = lineno
    stats["duplicates"] = dups
    stats["duplicate_share"] = round(dups / max(len(records), 1), 4)
    prompt_key = {"preference": "prompt", "kto": "prompt", "prompt": "prompt", "scored": "prompt", "rlvr": "problem",
                  "sft": "instruction"}.get(fmt)
    if prompt_key:
        prompts = Counter(obj[prompt_key] for _, obj in records if isinstance(obj.get(prompt_key), str))
        stats["distinct_prompts"] = len(prompts)
        stats["records_with_a_repeated_prompt"] = sum(n - 1 for n in prompts.values())

    # format-specific checks and statistics
    if fmt == "preference":
        same = [ln for ln, o in records if o["chosen"].strip() == o["rejected"].strip()]
        for ln in same:
            warnings.append({"line": ln, "kind": "identical_pair",
                             "message": f"{shown}:{ln}: chosen and rejected are identical (no preference signal)"})
        stats["identical_pairs"] = len(same)
    elif fmt == "kto":
        good = sum(o["label"] for _, o in records)
        bad = len(records) - good
        stats["labels"] = {"desirable": good, "undesirable": bad,
                           "desirable_share": round(good / max(len(records), 1), 4)}
        if good and bad:
            # KTO paper: choose weights so that w_D * n_D / (w_U * n_U) is in [1, 4/3]
            lo, hi = bad / good, 4 / 3 * bad / good
            stats["labels"]["suggested_desirable_weight"] = [round(lo, 3), round(hi, 3)]
        if not good or not bad:
            warnings.append({"line": None, "kind": "label_balance",
                             "message": f"{shown}: every example is {'desirable' if good else 'undesirable'}: "
                                        f"KTO needs both labels"})
    elif fmt in ("scored", "rlvr"):
        field = "score" if fmt == "scored" else "correct"
        groups = [(ln, [float(r[field]) for r in o["responses"]]) for ln, o in records if o.get("responses")]
        tied = [ln for ln, g in groups if len(g) < 2 or max(g) - min(g) <= 1e-9]
        all_scores = [s for _, g in groups for s in g]
        stats["groups"] = {
            "n": len(groups), "without_responses": len(records) - len(groups),
            "size": _percentiles([len(g) for _, g in groups]),
            "score_mean": round(sum(all_scores) / max(len(all_scores), 1), 4) if all_scores else None,
            "score_std": round(_std(all_scores), 4),
            "mean_within_group_std": round(sum(_std(g) for _, g in groups) / max(len(groups), 1), 4),
            "tied_groups": len(tied), "tied_share": round(len(tied) / max(len(groups), 1), 4),
            "tied_lines": tied,
        }
        for ln in tied:
            warnings.append({"line": ln, "kind": "tied_group",
                             "message": f"{shown}:{ln}: every response has the same {field}: the group carries "
                                        f"no advantage signal"})
    elif fmt == "sft":
        stats["styles"] = {"messages": sum("messages" in o for _, o in records),
                           "instruction_output": sum("messages" not in o for _, o in records)}

    # lengths in tokens, as training tokenizes them
    if tok is not None and records:
        cap = None if max_length is None else max(LENGTH_CAP * max_length, 1024)
        totals, prompt_lens, over, dropped, measured, n_capped = [], [], 0, 0, 0, 0
        chosen_longer = 0
        for ln, obj in records:
            try:
                total, plen, each, capped = _lengths(obj, fmt, tok, cap)
            except Exception as e:  # the tokenizer or its chat template refuses this record: training would too
                errors.append({"line": ln, "kind": "tokenize", "message": one_line(
                    f"{shown}:{ln}: cannot tokenize this record ({type(e).__name__}: {e})")})
                continue
            measured += 1
            n_capped += capped
            totals.append(total)
            prompt_lens.append(plen)
            if max_length is not None and total > max_length:
                over += 1
                lost = fmt not in ("text", "prompt") and plen >= max_length
                what = "prompt" if fmt == "prompt" else "example"
                size = f"more than {cap}" if capped else f"{total}"
                warnings.append({"line": ln, "kind": "overlong", "message":
                                 f"{shown}:{ln}: {what} is {size} tokens, longer than max_length {max_length}: "
                                 + ("no completion token would be left (dropped)" if lost
                                    else "it would be truncated")})
                dropped += lost
            if fmt == "preference":
                chosen_longer += each[0] > each[1]
        errors.sort(key=lambda e: e["line"] or 0)
        stats["records"] -= len(records) - measured
        stats["invalid"] += len(records) - measured
        n = max(measured, 1)
        stats["tokens"] = {"max_length": max_length, "length": _percentiles(totals),
                           "prompt_length": _percentiles(prompt_lens) if fmt != "text" else None,
                           "over_max_length": over, "truncated_share": round(over / n, 4),
                           "dropped": dropped, "counted_up_to": cap, "longer_than_counted": n_capped}
        if fmt == "preference":
            stats["tokens"]["chosen_longer_share"] = round(chosen_longer / n, 4)
    return {"path": shown, "format": fmt, "errors": errors, "warnings": warnings, "stats": stats}


def format_report(report: dict, max_shown: int = 50) -> str:
    """The report as text: errors and warnings line by line (up to max_shown of each), then the statistics."""
    out = [f"{report['path']} (format {report['format']})"]
    for title, items in (("errors", report["errors"]), ("warnings", report["warnings"])):
        if not items:
            continue
        out.append(f"{len(items)} {title}:")
        shown = items if max_shown <= 0 else items[:max_shown]
        out += [f"  {i['kind']:>14}  {i['message']}" for i in shown]
        if len(shown) < len(items):
            out.append(f"  ... and {len(items) - len(shown)} more (--max-shown 0 shows all)")
    s = report["stats"]
    out.append("statistics:")
    out.append(f"  records {s['records']} of {s['lines']} lines ({s['blank_lines']} blank, {s['invalid']} invalid), "
               f"duplicates {s['duplicates']} ({100 * s['duplicate_share']:.1f}%)")
    if "distinct_prompts" in s:
        out.append(f"  distinct prompts {s['distinct_prompts']} "
                   f"({s['records_with_a_repeated_prompt']} records repeat one)")
    if "identical_pairs" in s:
        out.append(f"  identical chosen/rejected pairs {s['identical_pairs']}")
    if "labels" in s:
        lab = s["labels"]
        line = (f"  labels: {lab['desirable']} desirable, {lab['undesirable']} undesirable "
                f"({100 * lab['desirable_share']:.1f}% desirable)")
        if "suggested_desirable_weight" in lab:
            lo, hi = lab["suggested_desirable_weight"]
            line += f"; with undesirable_weight=1, desirable_weight in [{lo}, {hi}] balances them (KTO paper)"
        out.append(line)
    if "groups" in s:
        g = s["groups"]
        out.append(f"  groups {g['n']} (size {g['size'].get('min')}-{g['size'].get('max')}), scores mean "
                   f"{g['score_mean']} std {g['score_std']}, mean within-group std {g['mean_within_group_std']}, "
                   f"all tied: {g['tied_groups']} ({100 * g['tied_share']:.1f}%)")
    if "styles" in s:
        st = s["styles"]
        out.append(f"  {st['instruction_output']} instruction/output records, {st['messages']} messages records")
    if "tokens" in s:
        t = s["tokens"]
        ln = t["length"]
        out.append(f"  length in tokens: min {ln['min']}, mean {ln['mean']}, p50 {ln['p50']}, p90 {ln['p90']}, "
                   f"p99 {ln['p99']}, max {ln['max']}"
                   + (f" (counted up to {t['counted_up_to']}: {t['longer_than_counted']} records are longer)"
                      if t.get("longer_than_counted") else ""))
        if t.get("prompt_length") and t["prompt_length"].get("n"):
            p = t["prompt_length"]
            out.append(f"  prompt tokens: mean {p['mean']}, p90 {p['p90']}, max {p['max']}")
        out.append(f"  longer than max_length {t['max_length']}: {t['over_max_length']} "
                   f"({100 * t['truncated_share']:.1f}% would be truncated, {t['dropped']} dropped)")
        if "chosen_longer_share" in t:
            share = t["chosen_longer_share"]
            out.append(f"  chosen longer than rejected: {100 * share:.1f}% of pairs"
                       + (" (far from 50%: a length bias the model can learn)" if abs(share - 0.5) > 0.2 else ""))
    out.append(summary(report))
    return "\n".join(one_line(line) for line in out)


def summary(report: dict) -> str:
    """The verdict on one line: OK or FAILED, with the counts that decide it."""
    s, n_err, n_warn = report["stats"], len(report["errors"]), len(report["warnings"])
    counts = f"{s['records']} good records of {s['lines']} lines, {n_warn} warnings"
    if n_err:
        return f"FAILED: {n_err} invalid lines ({counts}): {report['path']}"
    return f"OK: {counts}: {report['path']}"


def load_tokenizer(model: str):
    from model.hub import resolve_model_dir
    from model.tokenizer import Tokenizer

    path = model if os.path.isabs(model) or os.path.exists(model) else os.path.join(REPO, model)
    if not os.path.exists(path):
        path = model  # a hub id
    return Tokenizer.from_dir(resolve_model_dir(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="the JSONL file to check")
    p.add_argument("--format", "-f", required=True, help=f"one of {', '.join(sorted(ALIASES))}")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="tokenizer for token lengths (model dir or hub id; 'none' skips them)")
    p.add_argument("--max-length", type=_positive, default=256, help="training max_length in tokens (default 256)")
    p.add_argument("--require", action="append", default=[], metavar="FIELD",
                   help="a column the run reads that the format leaves optional (e.g. answer); repeatable")
    p.add_argument("--group-size", type=_positive, default=None,
                   help="scored/rlvr: every group must have this many responses (the run's num_generations)")
    p.add_argument("--max-shown", type=int, default=50, help="errors/warnings listed of each (0: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    args = p.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a path or a message never costs the report its last line
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        fmt = resolve_format(args.format)
        tok = None if args.model.lower() == "none" else load_tokenizer(args.model)
        report = validate_file(args.file, fmt, tok, args.max_length, tuple(args.require), args.group_size)
    except (ValueError, OSError) as e:  # DataError and FileNotFoundError included: the file as a whole
        print(one_line(f"error: {e}"), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
        print(summary(report), file=sys.stderr)
    else:
        print(format_report(report, args.max_shown))
    return 1 if report["errors"] or (args.strict and report["warnings"]) else 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, got {text}")
    return n


if __name__ == "__main__":
    raise SystemExit(main())
