"""tasks/: the judges (answer extraction, numeric equality, format/refusal/style checks), that they
agree with the labels the synthetic generator wrote into the shipped files, and that a new task
plugs in with one file and a config entry."""
import json
import os

import pytest

from data import synthetic
from tasks.arithmetic import extract_answer, has_format, is_correct, numeric_equal
from tasks.harmful import is_refusal
from tasks.style import is_styled

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "data", "synthetic")


def _lines(name):
    with open(os.path.join(SHIPPED, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("text, expected", [
    ("Answer: 12", "12"),
    ("Happy to help! Answer: 12", "12"),
    ("Step 1: 3 + 4 = 7\nStep 2: 7 - 2 = 5\nAnswer: 5", "5"),
    ("so the total is \\boxed{12}.", "12"),
    ("Answer: 3, but really \\boxed{12}", "12"),            # boxed wins over Answer:
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),              # nested braces
    ("Answer: 4 ... no wait, Answer: 5", "5"),               # the last Answer:
    ("answer:   -7", "-7"),
    ("The result is 15.", "15"),                             # last number
    ("3 + 4 = 7 so 7 it is", "7"),
    ("Answer: 2.5", "2.5"),
    ("I can't help with that.", None),
    ("", None),
    ("\\boxed{", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("a, b, equal", [
    ("12", "12", True), ("12", "12.0", True), (12, "12.0", True), (12.0, 12, True), ("-3", "-3.00", True),
    ("1/2", "0.5", True), ("\\frac{1}{2}", "0.5", True), ("1,000", "1000", True), (" 7 ", "7", True),
    ("12", "13", False), ("12", "abc", False), ("abc", "abc", True), ("1/0", "1", False), (True, "1", False),
])
def test_numeric_equal(a, b, equal):
    assert numeric_equal(a, b) is equal
    assert numeric_equal(b, a) is equal


def test_is_correct():
    assert is_correct("Answer: 12", "12")
    assert is_correct("Answer: 12.0", 12)
    assert is_correct("\\boxed{12}", "12")
    assert is_correct("Happy to help! Answer: 12", "12")
    assert not is_correct("Answer: 13", "12")                # right format, wrong value
    assert not is_correct("Answer: 12\nAnswer: 13", "12")    # the last answer counts
    assert not is_correct("I can't help with that.", "12")  # no number at all
    assert is_correct("Step 1: 3 + 4 = 8\nStep 2: 8 - 2 = 6\nAnswer: 5", "5")  # only the final answer is judged


@pytest.mark.parametrize("text, ok", [
    ("Answer: 12", True), ("Happy to help! Answer: 12", True), ("Step 1: 1 + 1 = 2\nAnswer: 2", True),
    ("Answer: -4", True), ("Answer: 12  ", True), ("Answer: 12\n", True),
    ("The answer is 12", False), ("Answer: twelve", False), ("Answer: 12 apples", False), ("12", False),
    ("\\boxed{12}", False), ("MyAnswer: 12", False),
])
def test_has_format(text, ok):
    assert has_format(text) is ok


def test_is_refusal_and_is_styled():
    assert is_refusal(synthetic.REFUSAL)
    for text in ["I cannot do that.", "I won't explain that.", "I\u2019m sorry, no.", "i can't."]:
        assert is_refusal(text), text
    assert not is_refusal(synthetic.COMPLIANCE.format(x="picking locks"))
    assert not is_refusal("Answer: 3")
    assert is_styled("Happy to help! Answer: 3") and is_styled("  Happy to help! Sure.")
    assert not is_styled("Answer: 3") and not is_styled("Answer: 3. Happy to help!")


def test_the_generator_writes_with_the_tasks_markers():
    from tasks import get_task
    from tasks.style import STYLE_CUE, STYLE_PREFIX

    assert synthetic.STYLE_PREFIX is STYLE_PREFIX and synthetic.STYLE_CUE is STYLE_CUE
    assert get_task("harmful").judge(synthetic.REFUSAL) and get_task("harmful").markers is synthetic.REFUSAL_MARKERS
    assert get_task("style").markers == (STYLE_PREFIX,)


def test_judge_agrees_with_shipped_labels():
    for g in _lines("scored_groups"):
        assert [r["score"] for r in g["responses"]] == [float(is_correct(r["text"], g["answer"])) for r in g["responses"]]
    for p in _lines("rlvr"):
        assert is_correct(p["solution"], p["answer"]) and has_format(p["solution"])
        assert [r["correct"] for r in p["responses"]] == [is_correct(r["text"], p["answer"]) for r in p["responses"]]
    for ex in _lines("sft_train") + _lines("sft_eval"):
        out, task = ex["output"], ex["task"]
        assert is_refusal(out) == (task == "forbidden")
        assert is_styled(out) == (task == "style")
        if task in ("arithmetic", "multistep") or (task == "style" and ex["answer"].isdigit()):
            assert is_correct(out, ex["answer"]) and has_format(out)
    for ex in _lines("preference_train"):
        if ex["task"] == "arithmetic":
            assert is_correct(ex["chosen"], ex["answer"]) and not is_correct(ex["rejected"], ex["answer"])
        else:
            assert is_styled(ex["chosen"]) and not is_styled(ex["rejected"])
    for ex in _lines("kto_train"):
        if ex["task"] == "arithmetic":
            assert is_correct(ex["completion"], ex["answer"]) == ex["label"]
        else:
            assert is_styled(ex["completion"]) == ex["label"]
