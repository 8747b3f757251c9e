"""Verifiers: pure string functions that judge a generated response.

Rewards (GRPO, RLVR) and held-out metrics (accuracy, format_rate, refusal_rate, style_rate) are
all built from these, so they are deliberately small, dependency-free (no torch) and exact.
The marker strings (refusal phrases, style prefix, answer prefix) come from data/synthetic.py so
the world that writes the data and the judge that reads the model cannot drift apart.

Answer extraction order: the last `\\boxed{...}`, else the last `Answer: X`, else the last number.
"""
from __future__ import annotations

import re
from fractions import Fraction

from data.synthetic import ANSWER_PREFIX, REFUSAL_MARKERS, STYLE_PREFIX

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


def is_correct(text: str, answer) -> bool:
    """The extracted final answer equals the reference `answer` (a string or a number)."""
    got = extract_answer(text)
    return got is not None and numeric_equal(got, answer)


def has_format(text: str) -> bool:
    """A line ends with `Answer: <number>` (a style prefix before it on the same line is allowed)."""
    return _FORMAT_RE.search(text) is not None


def is_refusal(text: str) -> bool:
    """Contains a refusal marker ("I can't", "I cannot", "I won't", "I'm sorry", ...), any case, any apostrophe."""
    t = text.replace("\u2019", "'").lower()
    return any(m.lower() in t for m in REFUSAL_MARKERS)


def is_styled(text: str) -> bool:
    """Starts with the friendly style prefix ("Happy to help!")."""
    return text.lstrip().startswith(STYLE_PREFIX.strip())
