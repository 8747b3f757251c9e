"""Reward functions: plain registered functions, one float per completion.

Every reward has the signature TRL's GRPOTrainer uses for reward functions:

    reward(prompts: list[str], completions: list[str], **fields) -> list[float]

where `fields` are the dataset columns, one list per column with one value per row (`answer=[...]`,
`tests=[...]`); a reward takes the columns it needs and ignores the rest. `@register("name")` adds a
function to REWARDS; `get_rewards(["math_answer", "format"])` returns them in order (the training
config names rewards, this registry resolves the names; an unknown name is an error that lists the
registered ones). Rewards are built from rollout/verifiers.py and rollout/sandbox.py and are exact.

    math_answer  1.0 iff the final answer (`\\boxed{}`, else `Answer: N`, else the last number) equals
                 `answer`. Right format with a wrong value scores 0.
    format       1.0 iff a line ends with `Answer: <number>`.
    style        1.0 iff the response starts with the style prefix ("Happy to help!").
    process      step-by-step verification for the multi-step format (see `step_scores`), blended with
                 the final answer by losses/rlvr.py `rlvr_rewards` (weight `process_weight`, default 0.5):
                 R = 0.5·[answer right] + 0.5·(share of correct steps).
    code         runs the completion's code against the row's `tests` (assert lines) in the sandbox;
                 reward = fraction of tests passed, 0 on any failure (timeout, exception, limits).
                 `code.last_results` keeps the SandboxResults (with reasons) of the latest call.

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
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Callable

from losses.rlvr import rlvr_rewards
from rollout.sandbox import run_code
from rollout.verifiers import has_format, is_correct, is_styled

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    """Decorator: add a reward function to REWARDS under `name`."""
    def deco(fn):
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].__module__}."
                             f"{REWARDS[name].__name__})")
        REWARDS[name] = fn
        fn.reward_name = name
        return fn
    return deco


def get_rewards(names) -> list[RewardFn]:
    """The registered functions for `names`, in order; ValueError naming the registered ones otherwise."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; registered rewards: {sorted(REWARDS)}")
    return [REWARDS[n] for n in names]


def _column(fields: dict, name: str, reward: str, n: int) -> list:
    if name not in fields or fields[name] is None:
        raise ValueError(f"reward {reward!r} needs the dataset column {name!r} (got columns {sorted(fields)})")
    col = list(fields[name])
    if len(col) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(col)} values for {n} completions")
    return col


def _check(prompts, completions):
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")


# ----------------------------------------------------------------------------- simple verifiers
@register("math_answer")
def math_answer(prompts, completions, **fields) -> list[float]:
    _check(prompts, completions)
    answers = _column(fields, "answer", "math_answer", len(completions))
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answers)]


@register("format")
def format_reward(prompts, completions, **fields) -> list[float]:
    _check(prompts, completions)
    return [1.0 if has_format(c) else 0.0 for c in completions]


@register("style")
def style(prompts, completions, **fields) -> list[float]:
    _check(prompts, completions)
    return [1.0 if is_styled(c) else 0.0 for c in completions]


# ----------------------------------------------------------------------------- process reward
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


@register("process")
def process(prompts, completions, process_weight: float = 0.5, **fields) -> list[float]:
    _check(prompts, completions)
    answers = _column(fields, "answer", "process", len(completions))
    problems = list(prompts) if prompts is not None else [None] * len(completions)
    steps = [step_scores(c, p) for c, p in zip(completions, problems)]
    outcome = [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answers)]
    return rlvr_rewards(steps, outcome, process_weight)


# ----------------------------------------------------------------------------- code reward
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last ```python fenced block of a completion (any ``` block), else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_results(completions, tests, timeout: float = 5.0, memory_mb: int = 256, max_workers: int = 4):
    """SandboxResult per completion, runs in parallel (each in its own sandboxed processes).
    RuntimeError (one line) where no sandbox layout can contain untrusted code on this machine."""
    tests = ["\n".join(t) if isinstance(t, (list, tuple)) else t for t in tests]
    jobs = [(extract_code(c), t) for c, t in zip(completions, tests)]
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        return list(pool.map(lambda j: run_code(j[0], j[1], timeout=timeout, memory_mb=memory_mb), jobs))


@register("code")
def code(prompts, completions, timeout: float = 5.0, memory_mb: int = 256, **fields) -> list[float]:
    _check(prompts, completions)
    tests = _column(fields, "tests", "code", len(completions))
    results = code_results(completions, tests, timeout=timeout, memory_mb=memory_mb)
    code.last_results = results
    return [r.score for r in results]


code.last_results = []


# ----------------------------------------------------------------------------- a trained reward model
def reward_model_reward(path: str, device=None, batch_size: int = 32) -> RewardFn:
    """A reward function scoring (prompt, completion) with a reward model saved by `method=reward`
    (a *ForSequenceClassification checkpoint): the scalar head on the last token of the chat."""
    import torch

    from data.formats import collate, tokenize_pair
    from losses.reward import sequence_rewards
    from model.load import load_model

    model, tok = load_model(path, dtype="fp32", device=device)
    if not hasattr(model, "score"):
        raise ValueError(f"{path}: not a reward model (config.json architectures should end in ForSequenceClassification)")
    dev = model.score.weight.device

    @torch.no_grad()
    def reward_model(prompts, completions, **fields) -> list[float]:
        _check(prompts, completions)
        out = []
        for i in range(0, len(completions), batch_size):
            seqs = [tokenize_pair(p, c, tok, None) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
            b = collate(seqs, tok.pad_token_id)
            out += sequence_rewards(model, lambda h: model.score(h).squeeze(-1), b["input_ids"].to(dev),
                                    b["attention_mask"].to(dev)).tolist()
        return out

    reward_model.reward_name = "reward_model"
    return reward_model
