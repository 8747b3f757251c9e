"""Task `arithmetic`: a question with a numeric answer, judged on the final answer of a greedy reply.

Metrics: `accuracy` (the final answer is numerically right) and `format_rate` (a line ends with
`Answer: N`). Rewards: `math_answer` (1 iff the final answer equals the row's `answer`) and `format`.
The judge is a pure string function, dependency-free and exact, shared with the multistep task,
on-policy pairs and the rewards, so "accuracy" means one thing everywhere.

Answer extraction order: the last `\\boxed{...}`, else the last `Answer: X`, else the last number.
Numbers compare as fractions ("12" == "12.0", "1/2" == "0.5" == "\\frac{1}{2}").

Two judges, one switch (`judge=` in the run config, `set_judge` here), so the reward that trains
and the accuracy that reports always agree:
  builtin      the matcher below: no dependency, microseconds, exact on `Answer: N`, integers,
               decimals and simple fractions; blind to LaTeX beyond `\\frac{a}{b}`, sets, units
               inside `\\boxed{}`, thousands separators and expressions.
  math_verify  Hugging Face's math-verify (`pip install -e ".[math]"`): parses LaTeX and plain
               expressions with sympy and compares them symbolically (sets, intervals, tuples,
               `\\sqrt{8}` == `2\\sqrt{2}`, units stripped); about 2 ms a call.
  auto         (the run default) math_verify when it is installed, else builtin. On the corpus of
               62 answer formats in tests/test_math_judge.py math_verify is right 57 times and the
               builtin matcher 39; on the synthetic `Answer: N` task the two agree on every row. The
               judge a run used is in its lineage.json.
"""
from __future__ import annotations

import re
from fractions import Fraction

from rollout.rewards import check_lengths, column, register
from tasks import GenerationTask, rate, register_task

ANSWER_PREFIX = "Answer: "  # how the synthetic world writes a final answer

_NUMBER = r"-?\d+(?:\.\d+)?(?:/\d+)?"
_ANSWER_RE = re.compile(re.escape(ANSWER_PREFIX.strip()) + r"\s*(" + _NUMBER + r")", re.IGNORECASE)
_FORMAT_RE = re.compile(r"(?m)\b" + re.escape(ANSWER_PREFIX.strip()) + r"[ \t]*" + _NUMBER + r"[ \t]*$")
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None when there is none (or it is unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in `text` as a string: `\\boxed{X}`, else `Answer: X`, else the last number."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    matches = _ANSWER_RE.findall(text)
    if matches:
        return matches[-1]
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _to_fraction(x) -> Fraction | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return Fraction(x) if x == x and abs(x) != float("inf") else None
    s = str(x).strip().strip("$").strip().rstrip(".").replace(",", "")
    m = _FRAC_RE.match(s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_equal(a, b) -> bool:
    """Equal as numbers ("12" == "12.0" == 12, "1/2" == "0.5"); non-numbers compare as stripped strings."""
    fa, fb = _to_fraction(a), _to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    if fa is not None or fb is not None:
        return False
    return str(a).strip() == str(b).strip()


JUDGES = ("builtin", "math_verify", "auto")
_judge = "builtin"  # what is_correct uses; a run sets it from its config (trainer/run.py setup)


def set_judge(name: str) -> str:
    """Choose the judge of is_correct for this process: builtin, math_verify or auto; returns the one used."""
    global _judge
    if name not in JUDGES:
        raise ValueError(f"judge={name!r}: expected one of {', '.join(JUDGES)}")
    if name == "builtin":
        _judge = name
        return name
    try:
        import math_verify  # noqa: F401
    except ImportError:
        if name == "math_verify":
            raise ValueError('judge=math_verify needs the math-verify package: pip install -e ".[math]" '
                             "(or judge=builtin)") from None
        _judge = "builtin"
        return _judge
    _judge = "math_verify"
    return _judge


def active_judge() -> str:
    return _judge


def math_verify_correct(text: str, answer) -> bool:
    """math-verify's verdict: the reference parsed as LaTeX (else as an expression), the reply as math-verify
    extracts its answer (\\boxed{} first, then the last expression), compared symbolically."""
    import threading

    from math_verify import parse, verify

    # math-verify's time limits use SIGALRM, which only the main thread may set
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = str(answer).strip()
    parsed_gold = parse(f"${gold}$", parsing_timeout=limit) or parse(gold, parsing_timeout=limit)
    parsed = parse(text, parsing_timeout=limit)
    return bool(parsed_gold) and bool(parsed) and verify(parsed_gold, parsed, timeout_seconds=limit)


def builtin_correct(text: str, answer) -> bool:
    """The hand-written matcher: the extracted final answer equals `answer` as a number or string."""
    got = extract_answer(text)
    return got is not None and numeric_equal(got, answer)


def is_correct(text: str, answer) -> bool:
    """The final answer in `text` equals the reference `answer` (a string or a number), by the active judge."""
    if _judge == "math_verify":
        return math_verify_correct(text, answer)
    return builtin_correct(text, answer)


def has_format(text: str) -> bool:
    """A line ends with `Answer: <number>` (a style prefix before it on the same line is allowed)."""
    return _FORMAT_RE.search(text) is not None


@register("math_answer", columns=("answer",))
def math_answer(prompts, completions, **fields) -> list[float]:
    """1.0 iff the final answer (boxed, else `Answer: N`, else the last number) equals `answer`."""
    check_lengths(prompts, completions)
    answers = column(fields, "answer", "math_answer", len(completions))
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answers)]


@register("format")
def format_reward(prompts, completions, **fields) -> list[float]:
    """1.0 iff a line ends with `Answer: <number>`."""
    check_lengths(prompts, completions)
    return [1.0 if has_format(c) else 0.0 for c in completions]


@register_task("arithmetic")
class Arithmetic(GenerationTask):
    data_format = "prompt"
    required = ("answer",)
    metrics = ("accuracy", "format_rate")
    reward = "math_answer"
    verdicts = ("correct", "format")

    def judge_all(self, texts, rows):
        return {"correct": [is_correct(t, r.get("answer")) for t, r in zip(texts, rows)],
                "format": [has_format(t) for t in texts]}

    def summarise(self, v):
        return {"accuracy": rate(v["correct"]), "format_rate": rate(v["format"])}
