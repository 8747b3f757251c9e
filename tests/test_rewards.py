"""rollout/rewards.py and the tasks' rewards: the registry, the verifier rewards on adversarial cases, the step-by-step
process reward, and the code reward through the sandbox (the sandbox itself: test_sandbox.py)."""
import json
import os

import pytest

from rollout.rewards import REWARDS, extract_code, get_rewards, register
from tasks.multistep import parse_problem, step_scores

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "data", "synthetic")


def _lines(name):
    with open(os.path.join(SHIPPED, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_registry_resolves_names_and_rejects_unknown_ones():
    assert {"math_answer", "format", "process", "code", "style"} <= set(REWARDS)
    fns = get_rewards(["math_answer", "format"])
    assert fns == [REWARDS["math_answer"], REWARDS["format"]]
    with pytest.raises(ValueError) as e:
        get_rewards(["math_answer", "corectness"])
    assert "corectness" in str(e.value) and "math_answer" in str(e.value) and "process" in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        register("format")(lambda prompts, completions, **kw: [0.0] * len(completions))


def test_plain_function_registration():
    @register("_test_length")
    def length(prompts, completions, **fields):
        return [float(len(c)) for c in completions]
    try:
        assert get_rewards(["_test_length"])[0](["p"], ["abc"], answer=["x"]) == [3.0]
    finally:
        del REWARDS["_test_length"]


def test_math_answer_adversarial_cases():
    math_answer = REWARDS["math_answer"]
    completions = [
        "Answer: 12",                              # right
        "Answer: 13",                              # right format, wrong value: 0
        r"<think></think>\boxed{999}",             # boxed hack with a wrong value: 0
        r"so it is \boxed{12}",                    # boxed right
        r"Answer: 13 ... final: \boxed{12}",       # the box wins
        "Happy to help! Answer: 12",
        "I think 12, no wait, Answer: 11",         # the last Answer: counts
        "",                                        # nothing: 0
        "Answer: 12.0",                            # numerically equal
    ]
    got = math_answer(["q"] * len(completions), completions, answer=["12"] * len(completions))
    assert got == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        math_answer(["q"], ["Answer: 1"])
    with pytest.raises(ValueError, match="1 values for 2"):
        math_answer(["q", "q"], ["Answer: 1", "x"], answer=["1"])


def test_format_and_style():
    fmt, style = REWARDS["format"], REWARDS["style"]
    texts = ["Answer: 7", "Happy to help! Answer: 7", "The result is 7.", "Answer: seven", "Answer: 7 because"]
    assert fmt([""] * 5, texts) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert style([""] * 5, texts) == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_verifiers_agree_with_the_shipped_scored_groups():
    math_answer = REWARDS["math_answer"]
    for row in _lines("scored_groups")[:50]:
        texts = [r["text"] for r in row["responses"]]
        assert math_answer([row["prompt"]] * 4, texts, answer=[row["answer"]] * 4) == [r["score"] for r in row["responses"]]


# ---------------------------------------------------------------- process reward

PROBLEM = "Compute 16 + 4 - 2 step by step."


def test_step_scores_recompute_every_step():
    assert step_scores("Step 1: 16 + 4 = 20\nStep 2: 20 - 2 = 18\nAnswer: 18") == [1.0, 1.0]
    assert step_scores("Step 1: 16 + 4 = 20\nStep 2: 20 - 2 = 19\nAnswer: 19") == [1.0, 0.0]
    # the buggy chain: step 1 wrong, step 2 right on the carried (wrong) value
    assert step_scores("Step 1: 16 + 4 = 21\nStep 2: 21 - 2 = 19\nAnswer: 19") == [0.0, 1.0]
    # a step that does not continue the chain is wrong even if its arithmetic is right
    assert step_scores("Step 1: 16 + 4 = 21\nStep 2: 20 - 2 = 18\nAnswer: 18") == [0.0, 0.0]
    assert step_scores("Happy to help! Step 1: 6 * 7 = 42\nStep 2: 42 / 4 = 10.5") == [1.0, 1.0]
    assert step_scores("Step 1: 5 / 0 = 0") == [0.0]
    assert step_scores("Step 1: sixteen plus four is 20\nStep 2: 20 - 2 = 18") == [0.0, 1.0]   # garbled: wrong, not skipped
    assert step_scores("Answer: 18") == []


def test_step_scores_against_the_problem():
    assert parse_problem(PROBLEM) == (16, [("+", 4), ("-", 2)])
    assert parse_problem("What is 4 -2?") == (4, [("-", 2)])
    assert parse_problem("no numbers here") is None
    good = "Step 1: 16 + 4 = 20\nStep 2: 20 - 2 = 18\nAnswer: 18"
    assert step_scores(good, PROBLEM) == [1.0, 1.0]
    # correct but unrelated arithmetic does not count
    assert step_scores("Step 1: 1 + 1 = 2\nStep 2: 2 + 2 = 4\nAnswer: 18", PROBLEM) == [0.0, 0.0]
    # a chain cut short: the missing step is wrong
    assert step_scores("Step 1: 16 + 4 = 20\nAnswer: 18", PROBLEM) == [1.0, 0.0]
    # extra steps beyond the problem are wrong
    assert step_scores(good.replace("Answer", "Step 3: 18 + 0 = 18\nAnswer"), PROBLEM) == [1.0, 1.0, 0.0]


def test_process_reward_partial_credit_and_no_full_marks_for_wrong_steps():
    process = REWARDS["process"]
    completions = [
        "Step 1: 16 + 4 = 20\nStep 2: 20 - 2 = 18\nAnswer: 18",      # all right
        "Step 1: 16 + 4 = 20\nStep 2: 20 - 2 = 19\nAnswer: 19",      # one wrong step, wrong answer
        "Step 1: 16 + 4 = 21\nStep 2: 21 - 2 = 18\nAnswer: 18",      # right answer, both steps wrong
        "Step 1: 16 + 4 = 21\nStep 2: 20 - 2 = 18\nAnswer: 18",      # right answer, a broken chain
        "Answer: 18",                                               # right answer, no work shown
        "Step 1: 16 + 4 = 21\nStep 2: 21 - 2 = 19\nAnswer: 19",      # the base model's bug
    ]
    got = process([PROBLEM] * 6, completions, answer=["18"] * 6)
    assert got == [1.0, 0.25, 0.5, 0.5, 0.5, 0.25]
    assert got[0] == 1.0 and 0 < got[1] < 1                          # one wrong step: partial
    assert all(g < 1.0 for g in got[2:5])                            # right answer, wrong steps: not full marks
    assert process([PROBLEM], [completions[0]], answer=["18"], process_weight=0.0) == [1.0]


def test_process_reward_ranks_the_shipped_rlvr_responses():
    process = REWARDS["process"]
    for row in _lines("rlvr")[:40]:
        texts = [r["text"] for r in row["responses"]]
        got = process([row["problem"]] * 4, texts, answer=[row["answer"]] * 4)
        for g, r in zip(got, row["responses"]):
            assert (g == 1.0) == r["correct"], (r["text"], g)
            assert g < 1.0 or r["text"].endswith(row["answer"])


# ---------------------------------------------------------------- code reward

def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 1\n```\nthen\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


def test_code_reward_fraction_of_tests_and_reasons():
    code = REWARDS["code"]
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",            # all pass
        "def add(a, b):\n    return a - b",                            # add(-1, 1) wrong... add(2,2) wrong
        "def add(a, b):\n    return 3",                                # one passes
        "def add(a, b) return a + b",                                  # syntax error
        "while True:\n    pass",                                       # timeout
    ]
    got = code(["p"] * 5, completions, tests=[tests] * 5, timeout=1.0)
    assert got == [1.0, 0.0, 1 / 3, 0.0, 0.0]
    reasons = [r.reason for r in code.last_results]
    assert "2 of 3 tests failed" in reasons[2]
    assert "compile" in reasons[3] and "timed out" in reasons[4]
    # tests may also come as a list of assert lines
    assert code(["p"], [completions[0]], tests=[tests.strip().splitlines()]) == [1.0]
