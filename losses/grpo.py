"""GRPO and its token-aggregation relatives (BNPO, Dr. GRPO, DAPO), plus DAPO's two data-side tricks.

GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300) drops PPO's critic: G
completions are sampled per prompt and each is scored against its own group.

Advantage (one scalar per completion, broadcast over its tokens): `group_advantages`, the "grpo"
estimator of losses/advantages.py (re-exported here), where its formula, scalings and the other
estimators (RLOO, REINFORCE++) are documented:
    A_i = (r_i − mean_group(r)) / (std(r) + eps),  eps = 1e-4,  scale_rewards = group | batch | none

Per-token objective, r_t = exp(logπ_t − logπ_old,t) (the ratio against the sampling policy):
    ℓ_t = −min(r_t·A, clip(r_t, 1 − ε_low, 1 + ε_high)·A) + β·k3_t
    k3_t = exp(logπ_ref,t − logπ_t) − (logπ_ref,t − logπ_t) − 1   (≥ 0, unbiased for KL(π‖π_ref),
           Schulman's "k3" estimator, http://joschu.net/blog/kl-approx.html); added only when β > 0 and
           ref_logps is given, so β = 0 never reads ref_logps in the loss.
    Defaults: β = 0.0, ε_low = ε_high = 0.2 (TRL's defaults; DAPO's clip-higher uses ε_high = 0.28).

Aggregation over the completion tokens (mask = 1; prompt and padding never count), `loss_type`:
    grpo     mean over sequences of each sequence's token mean: (1/N) Σ_i Σ_t ℓ_it / |o_i|
             (the paper; longer wrong answers are penalised less per token: a length bias)
    bnpo     token mean over the batch: Σ ℓ / Σ mask
    dr_grpo  token sum / (N · max_completion_length)    Dr. GRPO (Liu et al. 2025,
             https://arxiv.org/abs/2503.20783): a constant normaliser, no length bias.
             max_completion_length defaults to the padded width T; pass the configured maximum so the
             normaliser does not move from batch to batch.
    dapo     token sum / num_items_in_batch    DAPO (Yu et al. 2025, https://arxiv.org/abs/2503.14476):
             num_items_in_batch = completion tokens in the whole GENERATION batch (all gradient
             accumulation micro-batches together), so the micro-batch losses add up to one token mean.
             Defaults to this call's mask sum (then it equals bnpo).
    TRL's current default loss_type is "dapo"; ours is "grpo" (the paper's), chosen by config.

Metrics (detached; the normaliser of every metric is the completion-token count of this call):
    kl                 mean k3 over completion tokens; reported whenever ref_logps is given (TRL: only
                       when β ≠ 0), so a β = 0 run can still watch its drift.
    clip_ratio/low     share of tokens with r < 1 − ε_low AND A < 0 (clipping is active there)
    clip_ratio/high    share of tokens with r > 1 + ε_high AND A > 0
    clip_ratio/region  share of tokens in either (TRL's definitions, TRL logs them as *_mean)
    ratio_mean         mean of r over completion tokens (1 on the first, on-policy step)

Departures from TRL: none in the loss. TRL additionally divides grpo/bnpo/dr_grpo by the gradient
accumulation steps inside the loss; here that scaling is the training loop's business.

DAPO data tricks (Yu et al. 2025):
    overlong_penalty       soft overlong punishment, a reward added for length (TRL's
                           get_soft_overlong_punishment): 0 up to max_len − cache_len, then linear down
                           to −1 at max_len, −1 beyond.
    dynamic_sampling_keep  keep only groups whose rewards are not all tied (they have zero advantage).
"""
from __future__ import annotations

import typing
from typing import Literal

import torch

from losses.advantages import SCALE_REWARDS, _grouped, group_advantages  # noqa: F401  (re-exported: callers import them from here)
from losses.common import masked_mean, masked_sum, token_normaliser

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES = typing.get_args(LossType)


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: LossType = "grpo",
              max_completion_length: int | None = None, num_items_in_batch=None):
    """logps/old_logps/ref_logps/mask (N, T), advantages (N,). Returns (loss, metrics).

    old_logps=None means the first on-policy step (old = logps.detach(), every ratio is 1).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps and mask must both be (N, T), got {tuple(logps.shape)} and {tuple(mask.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be (N,) = ({logps.shape[0]},), got {tuple(advantages.shape)}")
    if old_logps is None:
        old_logps = logps.detach()
    keep = mask.bool()
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)[:, None]

    # padding positions may hold anything: they enter the exps as 0 (ratio 1, KL 0), never as inf * 0
    ratio = torch.exp(torch.where(keep, logps - old_logps, 0.0))
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None:
        d = torch.where(keep, ref_logps - logps, 0.0)
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        L = max_completion_length if max_completion_length is not None else logps.shape[1]
        if L <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {L}")
        loss = masked_sum(per_token, mask) / (logps.shape[0] * L)
    else:  # dapo
        loss = masked_sum(per_token, mask) / token_normaliser(num_items_in_batch, mask.sum())

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        metrics = {
            "loss": loss.detach(),
            "clip_ratio/low": masked_mean(low, mask),
            "clip_ratio/high": masked_mean(high, mask),
            "clip_ratio/region": masked_mean(torch.maximum(low, high), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


def grpo_normaliser(loss_type: str = "grpo", **_) -> str:
    """What grpo_loss divides by, for the feed that weights micro-batches (trainer/feeds/rollouts.py):
    grpo and dr_grpo a count of sequences, bnpo the micro-batch's tokens, dapo the whole batch's."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return {"grpo": "sequences", "dr_grpo": "sequences", "bnpo": "tokens", "dapo": "batch"}[loss_type]


grpo_loss.normaliser = grpo_normaliser


def overlong_penalty(lengths, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment for completion lengths (N,) -> (N,) float penalties in [−1, 0]."""
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    start = max_len - cache_len
    ramp = (start - lengths) / cache_len if cache_len > 0 else torch.zeros_like(lengths)
    out = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)


def dynamic_sampling_keep(rewards, group_size: int, atol: float = 1e-6) -> torch.Tensor:
    """(num_groups,) bool: True for groups whose rewards are not all tied (max − min > atol).

    Expand to completions with `.repeat_interleave(group_size)`.
    """
    groups = _grouped(torch.as_tensor(rewards, dtype=torch.float64), group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > atol
