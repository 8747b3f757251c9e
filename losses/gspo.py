"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, Qwen, https://arxiv.org/abs/2507.18071).

GRPO weights every token by its own ratio π/π_old, so one long completion carries hundreds of noisy
per-token ratios while the reward is a single number for the whole sequence. GSPO moves the importance
ratio, and its clipping, to the level the reward lives on: the sequence.

Sequence ratio (the geometric mean of the token ratios, length-normalised so that long and short
completions live on one scale):
    s_i = (π(o_i|x) / π_old(o_i|x))^(1/|o_i|) = exp((1/|o_i|) Σ_t (log π_it − log π_old,it))
Loss (advantages (N,), one per completion, e.g. losses/advantages.py's "grpo" estimator):
    L = −(1/N) Σ_i min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i)
    ∇ = −(1/N) Σ_i [unclipped_i]·A_i·s_i·(1/|o_i|) Σ_t ∇log π_it
(at s = 1, the first on-policy step, this is the REINFORCE gradient of the mean sequence log-prob).

GSPO-token (paper §4.3): pass per-token advantages (N, T) instead. Each token gets
    s_it = sg[s_i] · π_it / sg[π_it]      (value s_i; gradient flows only through its own token)
    L = −(1/N) Σ_i (1/|o_i|) Σ_t min(s_it·A_it, clip(s_it, 1 − ε_low, 1 + ε_high)·A_it)
With A_it = A_i for every t this equals GSPO in value, clipping and gradient (the paper's remark),
so a single code path computes both (it is verl's `compute_policy_loss_gspo`).

Defaults: ε_low = 3e-4, ε_high = 4e-4 (paper v2 §5.1; TRL's documented GSPO setup and verl's recipe),
β = 0: no KL term (the paper trains without one). The clip range is tiny because s_i is a per-token
geometric mean: a 4e-4 change of s_i is a large change of the sequence likelihood.
Normaliser: per-sequence token mean, then mean over the N sequences (TRL loss_type="grpo" at
importance_sampling_level="sequence"); a completion with no tokens contributes 0 and still counts in N.
Padding positions of logps, old_logps and (N, T) advantages may hold anything (even inf/NaN).

Metrics (detached):
    seq_ratio/min|mean|max   s_i over completions with at least one token (1 when there are none)
    clip_ratio/low           share of completion tokens whose term is clipped below (s < 1 − ε_low, A < 0)
    clip_ratio/high          share clipped above (s > 1 + ε_high, A > 0)
    clip_ratio/region        either; token-weighted, the "fraction of clipped tokens" of the paper's Fig. 2

Departures: from the paper, none in the loss. From TRL (GRPOTrainer._compute_loss with
importance_sampling_level="sequence", loss_type="grpo", β = 0): none in loss or gradient; TRL's
clip_ratio metrics at sequence level are shares of SEQUENCES, ours shares of tokens, and TRL divides
the loss by the gradient-accumulation steps inside the loss (here the loop's business). TRL's β·k3 and
other loss types are not offered at sequence level (TRL itself warns that they sum a per-sequence
constant over tokens). From verl: verl clamps log s_it at 10 before exp; no clamp here.
"""
from __future__ import annotations

import torch

from losses.common import masked_mean, policy_inputs


def gspo_loss(logps, old_logps, advantages, mask, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4):
    """logps/old_logps/mask (N, T); advantages (N,) for GSPO or (N, T) for GSPO-token. Returns (loss, metrics).

    old_logps=None means the first on-policy step (old = logps.detach(), every s_i is 1).
    """
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
    old_logps, keep, mask, adv = policy_inputs(logps, old_logps, advantages, mask)  # (N, T) adv: GSPO-token

    log_ratio = torch.where(keep, logps - old_logps, 0.0)
    log_s = masked_mean(log_ratio, mask, dim=-1).detach()            # (N,) log s_i
    # s_it = sg[s_i]·π_it/sg[π_it]: its value is s_i, its gradient is s_i·∇log π_it
    own = torch.where(keep, logps - logps.detach(), 0.0)
    s = torch.exp(log_s[:, None] + own)
    clipped = torch.clamp(s, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(s * adv, clipped * adv)
    loss = masked_mean(per_token, mask, dim=-1).mean()

    with torch.no_grad():
        seq = torch.exp(log_s)[keep.any(dim=-1)]
        if seq.numel() == 0:
            seq = torch.ones(1, dtype=logps.dtype, device=logps.device)
        low = ((s < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((s > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        metrics = {
            "loss": loss.detach(),
            "seq_ratio/min": seq.min(),
            "seq_ratio/mean": seq.mean(),
            "seq_ratio/max": seq.max(),
            "clip_ratio/low": masked_mean(low, mask),
            "clip_ratio/high": masked_mean(high, mask),
            "clip_ratio/region": masked_mean(torch.maximum(low, high), mask),
        }
    return loss, metrics
