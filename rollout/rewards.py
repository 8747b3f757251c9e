"""Reward functions: plain registered functions, one float per completion.

Every reward has the signature TRL's GRPOTrainer uses for reward functions:

    reward(prompts: list[str], completions: list[str], **fields) -> list[float]

where `fields` are the dataset columns, one list per column with one value per row (`answer=[...]`,
`tests=[...]`); a reward takes the columns it needs and ignores the rest. `@register("name")` adds a
function to REWARDS; `get_rewards(["math_answer", "format"])` returns them in order (the training
config names rewards, this registry resolves the names; an unknown name is an error that lists the
registered ones). Each task (tasks/) registers the rewards built from its judge; this file holds
the registry, the code reward (rollout/sandbox.py) and the reward-model reward.

    math_answer  tasks/arithmetic.py: 1.0 iff the final answer equals `answer`
    format       tasks/arithmetic.py: 1.0 iff a line ends with `Answer: <number>`
    style        tasks/style.py: 1.0 iff the response starts with the style prefix
    process      tasks/multistep.py: every written step verified, blended with the final answer
    code         runs the completion's code against the row's `tests` (assert lines) in the sandbox;
                 reward = fraction of tests passed, 0 on any failure (timeout, exception, limits).
                 `code.last_results` keeps the SandboxResults (with reasons) of the latest call.
    reward_model a checkpoint written by method=reward (`reward_model_reward(path)`)
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from rollout.sandbox import run_code

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}


def register(name: str, columns: tuple[str, ...] = ()):
    """Decorator: add a reward function to REWARDS under `name`; `columns` are the dataset columns it
    reads, which the RL feed checks every training row for before the first step."""
    def deco(fn):
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].__module__}."
                             f"{REWARDS[name].__name__})")
        REWARDS[name] = fn
        fn.reward_name = name
        fn.columns = tuple(columns)
        return fn
    return deco


def get_rewards(names) -> list[RewardFn]:
    """The registered functions for `names`, in order; ValueError naming the registered ones otherwise."""
    import tasks  # noqa: F401  (the tasks register their rewards: math_answer, format, style, process)

    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; registered rewards: {sorted(REWARDS)}")
    return [REWARDS[n] for n in names]


def column(fields: dict, name: str, reward: str, n: int) -> list:
    """The dataset column `name` a reward reads, one value per completion (a clear error otherwise)."""
    if name not in fields or fields[name] is None:
        raise ValueError(f"reward {reward!r} needs the dataset column {name!r} (got columns {sorted(fields)})")
    col = list(fields[name])
    if len(col) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(col)} values for {n} completions")
    return col


def check_lengths(prompts, completions):
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")


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


@register("code", columns=("tests",))
def code(prompts, completions, timeout: float = 5.0, memory_mb: int = 256, **fields) -> list[float]:
    check_lengths(prompts, completions)
    tests = column(fields, "tests", "code", len(completions))
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
        check_lengths(prompts, completions)
        out = []
        for i in range(0, len(completions), batch_size):
            seqs = [tokenize_pair(p, c, tok, None) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
            b = collate(seqs, tok.pad_token_id)
            out += sequence_rewards(model, lambda h: model.score(h).squeeze(-1), b["input_ids"].to(dev),
                                    b["attention_mask"].to(dev)).tolist()
        return out

    reward_model.reward_name = "reward_model"
    return reward_model
