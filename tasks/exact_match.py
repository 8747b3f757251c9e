"""Task `exact_match`: your own question-answer set, by config and no code.

    data.eval.myqa: {task: exact_match, path: my_questions.jsonl, match: normalized}

Rows are `{"prompt": ..., "answer": ...}`. A greedy reply is right when it matches the answer:
    exact        the reply equals the answer, surrounding whitespace ignored
    normalized   the same after lower-casing, collapsing whitespace and dropping trailing . ! ?
    contains     the normalized answer occurs in the normalized reply
    numeric      the final answer extracted from the reply (tasks/arithmetic.py) equals it as a number
Metric: `exact_match`, prefixed by the set name (`myqa/exact_match`) unless the set is named exact_match.
"""
from __future__ import annotations

import re
from typing import Literal

from tasks import GenerationTask, rate, register_task
from tasks.arithmetic import is_correct

MATCHES = ("exact", "normalized", "contains", "numeric")


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().lower()).rstrip(".!? ")


def matches(reply: str, answer, how: str) -> bool:
    if how == "exact":
        return reply.strip() == str(answer).strip()
    if how == "normalized":
        return normalize(reply) == normalize(answer)
    if how == "contains":
        return normalize(answer) in normalize(reply)
    return is_correct(reply, answer)


@register_task("exact_match")
class ExactMatch(GenerationTask):
    data_format = "prompt"
    required = ("answer",)
    metrics = ("exact_match",)
    verdicts = ("correct",)

    def configure(self, match: Literal["exact", "normalized", "contains", "numeric"] = "normalized") -> None:
        if match not in MATCHES:
            raise ValueError(f"data.eval.{self.set_name}.match: expected one of {MATCHES}, got {match!r}")
        self.match = match

    def judge_all(self, texts, rows):
        return {"correct": [matches(t, r["answer"], self.match) for t, r in zip(texts, rows)]}

    def summarise(self, v):
        return {"exact_match": rate(v["correct"])}
