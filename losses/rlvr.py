"""RLVR: reinforcement learning with verifiable rewards = GRPO whose rewards come from a checker.

RLVR (the name is Tülu 3's, Lambert et al. 2024, https://arxiv.org/abs/2411.15124) trains on rewards
a program computes, not a learned reward model: the final answer is right (rollout/verifiers.py),
the tests pass (rollout/sandbox.py). The policy loss is GRPO's, imported from losses/grpo.py and not
repeated here; this file only adds how a process reward is blended with the outcome.

Process + outcome reward, `rlvr_rewards`. For a multi-step solution ("Step 1: 3 + 4 = 7\\nStep 2:
7 - 2 = 5\\nAnswer: 5") every written step is recomputed (rollout/rewards.py `step_scores`: 1.0 for a
correct step, 0.0 for a wrong one) and the per-completion reward is

    R = (1 − w) · outcome + w · mean(step_scores)          w = process_weight = 0.5 by default

with outcome ∈ [0, 1] (1.0 when the final answer is right). A completion that writes no step at all
has process score 0: on a step-by-step task a bare answer earns at most 1 − w. Consequences that the
tests pin: a correct chain with a correct answer scores 1; one wrong step scores partially; a right
final answer reached through a wrong step is not full marks (the process term catches the lucky or
copied answer that outcome-only rewards would pay in full, cf. process supervision, Lightman et al.
2023, https://arxiv.org/abs/2305.20050, here with exact programmatic step checks instead of a
learned process reward model). w = 0 is plain outcome RLVR, w = 1 pays the steps only.

The advantage and loss are then GRPO's: `group_advantages(R, G)` and `grpo_loss(...)`.
"""
from __future__ import annotations

from losses.grpo import LOSS_TYPES, group_advantages, grpo_loss  # noqa: F401  (RLVR's policy loss is GRPO's)

rlvr_loss = grpo_loss


def rlvr_rewards(step_scores: list[list[float]], outcome: list[float], process_weight: float = 0.5) -> list[float]:
    """(1 − w)·outcome + w·mean(steps) per completion; a completion without steps has process score 0."""
    if not 0.0 <= process_weight <= 1.0:
        raise ValueError(f"process_weight must be in [0, 1], got {process_weight}")
    if len(step_scores) != len(outcome):
        raise ValueError(f"{len(step_scores)} step-score lists for {len(outcome)} outcomes")
    out = []
    for steps, o in zip(step_scores, outcome):
        process = sum(steps) / len(steps) if len(steps) else 0.0
        out.append((1.0 - process_weight) * float(o) + process_weight * float(process))
    return out
