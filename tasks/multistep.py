"""Task `multistep`: a chain `a op b op c` answered step by step, judged on every step and the answer.

Metrics: `multistep_accuracy` (final answer right) and `process_score` (the `process` reward: half
the final answer, half the share of correct steps). Reward: `process`.

Step checking (`step_scores`). Every line with `Step k:` is one step and must read `x op y = z`
(op one of + - * / × ÷). A step scores 1.0 when all of these hold, else 0.0:
    * its arithmetic is right (z recomputed exactly, as fractions);
    * it continues the chain: x equals the previous step's written result (step 1: the problem's
      first number, when the problem is known);
    * when the problem (`a op1 b op2 c ...`, found in the prompt) is known: op and y are the problem's
      next operator and operand.
With a known problem, missing steps count as wrong (a chain cut short is not a correct chain) and
steps beyond the problem's length are wrong. A garbled `Step k:` line is a wrong step, never skipped.
So a chain with one wrong step scores partially, and a right final answer reached through a wrong
(or unrelated) chain is not full marks.
"""
from __future__ import annotations

import re
from fractions import Fraction

from losses.rlvr import rlvr_rewards
from rollout.rewards import check_lengths, column, register
from tasks import GenerationTask, rate, register_task
from tasks.arithmetic import is_correct

_NUM = r"-?\d+(?:\.\d+)?"
_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "×": "*", "÷": "/"}
_STEP_LINE = re.compile(r"\bStep\s*\d+\s*:(.*)$", re.IGNORECASE)
_STEP_BODY = re.compile(rf"^\s*({_NUM})\s*([-+*/×÷])\s*({_NUM})\s*=\s*({_NUM})\s*\.?\s*$")
_PROBLEM = re.compile(rf"({_NUM}(?:\s*[-+*/×÷]\s*{_NUM})+)")
_TOKEN = re.compile(rf"{_NUM}|[-+*/×÷]")


def _apply(x: Fraction, op: str, y: Fraction) -> Fraction | None:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y if y != 0 else None


def parse_problem(text: str) -> tuple[Fraction, list[tuple[str, Fraction]]] | None:
    """The first `a op b op c ...` expression in text as (a, [(op, b), (op, c), ...]); None if absent."""
    m = _PROBLEM.search(text or "")
    if not m:
        return None
    tokens = _TOKEN.findall(m.group(1))
    # the tokenizer reads "4 -2" as 4, -2: re-split so operators and operands alternate
    seq: list[str] = []
    for t in tokens:
        if seq and seq[-1] not in _OPS and t.startswith("-") and len(t) > 1:
            seq += ["-", t[1:]]
        else:
            seq.append(t)
    if len(seq) < 3 or len(seq) % 2 == 0:
        return None
    first = Fraction(seq[0])
    return first, [(_OPS[seq[i]], Fraction(seq[i + 1])) for i in range(1, len(seq), 2)]


def step_scores(text: str, problem: str | None = None) -> list[float]:
    """1.0 / 0.0 per written step (see the module doc); with `problem`, one score per required step."""
    expected = parse_problem(problem) if problem else None
    scores: list[float] = []
    prev: Fraction | None = expected[0] if expected else None
    for line in text.splitlines():
        m = _STEP_LINE.search(line)
        if not m:
            continue
        k = len(scores)
        body = _STEP_BODY.match(m.group(1))
        if not body:
            scores.append(0.0)
            prev = None
            continue
        x, op, y, z = Fraction(body.group(1)), _OPS[body.group(2)], Fraction(body.group(3)), Fraction(body.group(4))
        ok = _apply(x, op, y) == z
        if prev is not None and x != prev:
            ok = False
        if expected is not None:
            ok = ok and k < len(expected[1]) and expected[1][k] == (op, y)
        scores.append(1.0 if ok else 0.0)
        prev = z
    if expected is not None and len(scores) < len(expected[1]):
        scores += [0.0] * (len(expected[1]) - len(scores))
    return scores


@register("process", columns=("answer",))
def process(prompts, completions, process_weight: float = 0.5, **fields) -> list[float]:
    """R = (1 − w)·[final answer right] + w·(share of correct steps), w = process_weight (losses/rlvr.py)."""
    check_lengths(prompts, completions)
    answers = column(fields, "answer", "process", len(completions))
    problems = list(prompts) if prompts is not None else [None] * len(completions)
    steps = [step_scores(c, p) for c, p in zip(completions, problems)]
    outcome = [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answers)]
    return rlvr_rewards(steps, outcome, process_weight)


@register_task("multistep")
class Multistep(GenerationTask):
    data_format = "rlvr"
    required = ("answer",)
    metrics = ("multistep_accuracy", "process_score")
    reward = "process"
    verdicts = ("correct", "process_score")
    min_new_tokens = 48  # a three-step chain and its answer

    def prompt(self, row):
        return row["problem"]

    def judge_all(self, texts, rows):
        answers = [r.get("answer") for r in rows]
        return {"correct": [is_correct(t, a) for t, a in zip(texts, answers)],
                "process_score": process([r["problem"] for r in rows], texts, answer=answers)}

    def summarise(self, v):
        scores = v["process_score"]
        return {"multistep_accuracy": rate(v["correct"]),
                "process_score": round(sum(scores) / max(len(scores), 1), 4)}
