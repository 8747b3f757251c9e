"""CISPO: Clipped Importance-Sampling-weight Policy Optimization (MiniMax-M1, https://arxiv.org/abs/2506.13585).

PPO/GRPO clip the ratio·advantage product, so a token whose ratio leaves the trust region gets NO
gradient at all; MiniMax-M1 reports that those are often rare, high-ratio "fork" tokens (words such
as "However", "Wait") that reflective reasoning depends on, and that dropping them hurts. CISPO clips the importance WEIGHT instead, stops its gradient,
and keeps every token's REINFORCE term:
    r_t = exp(log π_t − log π_old,t)
    w_t = sg(clip(r_t, 1 − ε_low, 1 + ε_high))
    L   = −Σ_{i,t} w_it · A_i · log π_it / Σ_{i,t} 1          (over completion tokens)
    ∇   = −Σ w_it · A_i · ∇log π_it / n_tokens
So with no clipping active the gradient is the vanilla importance-sampled policy gradient
r·A·∇log π, and a clipped token still learns, with its weight capped. The loss VALUE is a surrogate
(it contains log π), not an objective to read.

Defaults: epsilon_low = None: no lower bound (MiniMax-M1 sets ε_low large and tunes only ε_high;
TRL has no lower bound either); epsilon_high = 4.0, i.e. the weight is capped at 1 + ε_high = 5.0, the ScaleRL recipe's
ε_max = 5 (Khatri et al. 2025, https://arxiv.org/abs/2510.13786, which writes sg(min(r, ε_max))) and
TRL's recommended epsilon_high=5.0. NOTE the convention: TRL's `epsilon_high` for cispo IS the cap;
here ε_high is an offset from 1, as in the MiniMax formula and in grpo_loss. ScaleRL pairs it with
batch-scaled rewards: advantages from losses/advantages.py's "grpo" estimator with
scale_rewards="batch".
Advantages (N,) broadcast over tokens, or per-token (N, T). Padding positions of logps, old_logps
and (N, T) advantages may hold anything (even inf/NaN).
Normaliser: token sum / num_items_in_batch, the completion tokens of the whole generation batch
(all micro-batches), so micro-batch losses add up to one token mean (the paper's 1/Σ|o_i|; TRL's
cispo normaliser, shared with dapo). Defaults to this call's completion-token count.

Metrics (detached, shares of completion tokens):
    clip_ratio/low     r < 1 − ε_low (weight raised to the floor; never with epsilon_low=None)
    clip_ratio/high    r > 1 + ε_high (weight capped)
    clip_ratio/region  either: the share of tokens whose weight was clipped, whatever A's sign
    cispo_clip_ratio   r > 1 + ε_high and A > 0 (TRL's `cispo_clip_ratio`)
    ratio_mean         mean r (1 on the first, on-policy step)
    weight_mean        mean w

Departures: from the paper, none (its optional token mask M_it for a PPO-style trust region is not
implemented). From TRL (GRPOTrainer._compute_loss, loss_type="cispo", token-level ratios): none in
loss or gradient, given TRL epsilon_high = 1 + our ε_high and no lower bound (TRL has none); TRL's
β·k3 term is not offered (β = 0, as in the paper and ScaleRL). TRL rescales num_items_in_batch
inside the loss for processes and accumulation (÷ processes × accumulation steps ÷ steps per
generation); here the caller passes the token count that the call's share of the gradient should use.
"""
from __future__ import annotations

import torch

from losses.common import masked_mean, masked_sum, policy_inputs, token_normaliser


def cispo_loss(logps, old_logps, advantages, mask, epsilon_low: float | None = None, epsilon_high: float = 4.0,
               num_items_in_batch=None):
    """logps/old_logps/mask (N, T), advantages (N,) or (N, T). Returns (loss, metrics).

    old_logps=None means the first on-policy step (old = logps.detach(), every weight is 1).
    """
    if epsilon_low is not None and not 0 <= epsilon_low <= 1:
        raise ValueError(f"epsilon_low must be in [0, 1] (the weight floor 1 − epsilon_low) or None, got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0 (the weight cap is 1 + epsilon_high), got {epsilon_high}")
    old_logps, keep, mask, adv = policy_inputs(logps, old_logps, advantages, mask)

    ratio = torch.exp(torch.where(keep, logps - old_logps, 0.0)).detach()
    floor = None if epsilon_low is None else 1 - epsilon_low
    weight = torch.clamp(ratio, min=floor, max=1 + epsilon_high)
    per_token = -weight * adv * torch.where(keep, logps, 0.0)
    loss = masked_sum(per_token, mask) / token_normaliser(num_items_in_batch, mask.sum())

    with torch.no_grad():
        low = (ratio < floor) if floor is not None else torch.zeros_like(keep)
        high = ratio > 1 + epsilon_high
        metrics = {
            "loss": loss.detach(),
            "clip_ratio/low": masked_mean(low.to(mask.dtype), mask),
            "clip_ratio/high": masked_mean(high.to(mask.dtype), mask),
            "clip_ratio/region": masked_mean((low | high).to(mask.dtype), mask),
            "cispo_clip_ratio": masked_mean((high & (adv > 0)).to(mask.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "weight_mean": masked_mean(weight, mask),
        }
    return loss, metrics


cispo_loss.normaliser = "batch"  # divided by num_items_in_batch: the whole batch's completion tokens (trainer/feeds)
