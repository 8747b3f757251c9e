"""The two math judges (tasks/arithmetic.py): the hand-written matcher and math-verify, on a corpus of
answer formats labelled by hand (LaTeX, fractions, \\boxed{}, units, sets, negatives, decimals,
`Answer: N`, prose). The judge that is right more often is the run default (judge=auto uses
math-verify where it is installed); `python tests/test_math_judge.py` prints the agreement table."""
import sys

import pytest

from tasks import arithmetic
from tasks.arithmetic import builtin_correct, is_correct, set_judge

# (completion, reference answer, is the completion right?), labelled by hand
CORPUS = [
    # plain "Answer: N" (the synthetic world)
    ("Answer: 7", "7", True),
    ("Answer: 8", "7", False),
    ("3 + 4 = 7\nAnswer: 7", "7", True),
    ("Happy to help! Answer: 12", "12", True),
    ("Answer: -3", "-3", True),
    ("Answer: 3", "-3", False),
    # negatives
    ("x = -3", "-3", True),
    ("The result is −3.", "-3", True),          # unicode minus
    ("The answer is $-\\frac{1}{2}$.", "-0.5", True),
    ("The temperature dropped to -5 degrees.", "-5", True),
    # decimals
    ("Answer: 0.50", "1/2", True),
    ("Answer: 2.5", "5/2", True),
    ("The answer is 3.14", "3.14159", False),
    ("Answer: 1.0", "1", True),
    ("Answer: .5", "0.5", True),
    ("Answer: 1,000", "1000", True),
    ("So we get 12,345 in total.", "12345", True),
    # fractions
    ("Answer: 3/4", "0.75", True),
    ("Answer: 6/8", "3/4", True),
    ("The probability is $\\frac{3}{4}$.", "3/4", True),
    ("The probability is $\\dfrac{3}{4}$.", "0.75", True),
    ("The probability is $\\frac34$.", "3/4", True),
    ("The probability is $\\frac{4}{3}$.", "3/4", False),
    # \boxed{}
    ("So the final answer is $\\boxed{42}$.", "42", True),
    ("First 40, then $\\boxed{41}$.", "42", False),
    ("$\\boxed{\\frac{1}{3}}$", "1/3", True),
    ("Thus $x = \\boxed{2\\sqrt{2}}$.", "2\\sqrt{2}", True),
    ("Thus $x = \\boxed{\\sqrt{8}}$.", "2\\sqrt{2}", True),
    ("The area is $\\boxed{4\\pi}$.", "4\\pi", True),
    ("The area is $\\boxed{4\\pi}$.", "12.566", False),
    ("The answer is \\boxed{x = 5}.", "5", True),
    ("\\boxed{5} is wrong; the answer is \\boxed{6}", "6", True),
    # LaTeX expressions
    ("The answer is $2x + 1$.", "1 + 2x", True),
    ("The roots give $x^2 - 1 = (x-1)(x+1)$, so the answer is $(x-1)(x+1)$.", "x^2 - 1", True),
    ("The answer is $\\sqrt{2}/2$.", "\\frac{\\sqrt{2}}{2}", True),
    ("We get $\\frac{\\pi}{2}$.", "\\pi/2", True),
    ("We get $2^{10}$.", "1024", True),
    # units
    ("The length is 12 cm.", "12", True),
    ("Answer: 12 cm", "12", True),
    ("The answer is $\\boxed{12\\text{ cm}}$.", "12", True),
    ("It costs \\$5.", "5", True),
    ("The angle is $45^\\circ$.", "45", True),
    ("The speed is 60 km/h.", "60", True),
    ("It takes 3 hours.", "4", False),
    # percentages
    ("The rate is 50%.", "50", True),
    ("The rate is $50\\%$.", "50", True),
    # sets and tuples
    ("The solutions are $\\{1, 2\\}$.", "\\{1, 2\\}", True),
    ("The solutions are $\\{2, 1\\}$.", "\\{1, 2\\}", True),
    ("The solutions are $\\{1, 3\\}$.", "\\{1, 2\\}", False),
    ("$x = 1$ or $x = 2$, so $\\boxed{1, 2}$.", "1, 2", True),
    ("The point is $(2, 3)$.", "(2, 3)", True),
    ("The point is $(3, 2)$.", "(2, 3)", False),
    ("The interval is $[0, 1)$.", "[0, 1)", True),
    # last-number traps and prose
    ("I tried 3 and 4, and the sum is 7.", "7", True),
    ("The answer is 7, since 3 + 4 = 7.", "7", True),
    ("The answer is 5. Check: 5 + 2 = 7.", "5", True),
    ("There are 3 apples and 4 pears.", "7", False),
    ("I don't know.", "7", False),
    ("", "7", False),
    ("Answer: seven", "7", False),
    # scientific notation
    ("The answer is $1.5 \\times 10^3$.", "1500", True),
    ("Answer: 1e3", "1000", True),
]


def table():
    """{(builtin verdict right, math_verify verdict right): count} and each judge's number right."""
    from tasks.arithmetic import math_verify_correct

    cells, right = {}, {"builtin": 0, "math_verify": 0}
    for text, gold, truth in CORPUS:
        b, m = builtin_correct(text, gold) == truth, math_verify_correct(text, gold) == truth
        cells[(b, m)] = cells.get((b, m), 0) + 1
        right["builtin"] += b
        right["math_verify"] += m
    return cells, right


@pytest.fixture(autouse=True)
def builtin_afterwards():
    yield
    set_judge("builtin")


def test_the_builtin_matcher_on_the_corpus():
    wrong = [(t, g) for t, g, truth in CORPUS if builtin_correct(t, g) != truth]
    assert len(CORPUS) == 62 and len(wrong) == 23  # blind to LaTeX beyond \\frac{a}{b}, sets, separators, units
    assert ("The solutions are $\\{2, 1\\}$.", "\\{1, 2\\}") in wrong and ("Answer: 1,000", "1000") in wrong


def test_math_verify_is_right_more_often_than_the_builtin_matcher():
    pytest.importorskip("math_verify", reason="the `math` extra (math-verify) is not installed")
    cells, right = table()
    assert right == {"builtin": 39, "math_verify": 57}
    assert cells == {(True, True): 37, (False, True): 20, (True, False): 2, (False, False): 3}


def test_the_switch_reaches_the_reward_and_auto_falls_back_without_math_verify(monkeypatch):
    from rollout.rewards import get_rewards

    (reward,) = get_rewards(["math_answer"])
    texts = ["The solutions are $\\{2, 1\\}$.", "Answer: 7"]
    assert set_judge("builtin") == "builtin" and reward(None, texts, answer=["\\{1, 2\\}", "7"]) == [0.0, 1.0]
    if arithmetic.set_judge("auto") == "math_verify":
        assert reward(None, texts, answer=["\\{1, 2\\}", "7"]) == [1.0, 1.0]
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    assert set_judge("auto") == "builtin" and not is_correct(texts[0], "\\{1, 2\\}")
    with pytest.raises(ValueError, match=r'judge=math_verify needs the math-verify package: pip install -e "\.\[math\]"'):
        set_judge("math_verify")


def test_judge_is_a_typed_run_option():
    from trainer.config import ConfigError, compose

    assert compose(["method=grpo"]).judge == "auto"
    with pytest.raises(ConfigError, match="judge: expected one of 'auto', 'builtin', 'math_verify'"):
        compose(["method=grpo", "judge=sympy"])


if __name__ == "__main__":
    cells, right = table()
    print(f"{len(CORPUS)} answers; right: builtin {right['builtin']}, math_verify {right['math_verify']}")
    print("| builtin \\ math_verify | right | wrong |\n|---|---|---|")
    for b in (True, False):
        print(f"| {'right' if b else 'wrong'} | {cells.get((b, True), 0)} | {cells.get((b, False), 0)} |")
    for text, gold, truth in CORPUS:
        b, m = builtin_correct(text, gold), arithmetic.math_verify_correct(text, gold)
        if b != truth or m != truth:
            print(f"  truth {truth!s:5} builtin {b!s:5} math_verify {m!s:5}  {gold!r:24} {text!r}")
