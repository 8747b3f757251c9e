"""Nash-MD: Nash learning from human feedback by mirror descent (Munos et al. 2023,
https://arxiv.org/abs/2312.00886), in the policy-gradient form TRL's NashMDTrainer runs.

Instead of maximising a reward, the policy plays a preference game against a regularised copy of
itself. Each step, for a prompt x:
    y  ~ π(·|x)                      a completion of the policy
    y' ~ π_mix(·|x)                  a completion of the geometric mixture of policy and reference
    P  = P(y ≻ y' | x) ∈ [0, 1]      from a judge, or σ(r(y) − r(y')) with a reward model
                                     (`preference_probability`, TRL's reward-model path)

Geometric mixture, token by token (`mixture_logits`, β_mix = mixture_coef, TRL default 0.5):
    log π_mix(·|ctx) = log_softmax((1 − β_mix)·log π(·|ctx) + β_mix·log π_ref(·|ctx))
i.e. π_mix ∝ π^(1−β_mix) · π_ref^β_mix, renormalised over the vocabulary. TRL mixes raw logits
(log_softmax(β_mix·z_ref + (1 − β_mix)·z)); the per-position log-normalisers are constants that
log_softmax removes, so the two are the same distribution. β_mix = 0 is the policy, 1 the reference.

Loss (`nash_md_loss`; TRL's `_compute_losses`), with S = Σ_t log π(y_t) over completion tokens of y:
    score   = (P − 0.5) · S                     REINFORCE; 0.5 is the control variate (a tie)
    kl_term = Σ_t sg[log π(y_t) − log π_ref(y_t)] · log π(y_t)
    loss    = mean over the batch of (β · kl_term − score)          β = 0.1 (TRL default)
The loss VALUE is not an objective: its gradient is the policy-gradient estimate
    −(P − ½)·∇log π(y) + β·(log π(y) − log π_ref(y))·∇log π(y)
whose second part is the score-function estimate of ∇KL(π‖π_ref) (sg = stop-gradient, `detach`).
Normalisers: sums over completion tokens (masked_sum) per sequence, mean over sequences.

Metrics (detached, TRL's names where it has them): `loss/score` (mean score), `loss/kl` (mean
sequence log-ratio Σ_t(log π − log π_ref), a k1 estimate of the sequence KL), `rewards/probabilities`
(mean P), `rewards/margins` (mean S − S_ref), `rewards/accuracies` (share with S > S_ref),
`objective/entropy` (mean −S), `logps/policy` and `logps/ref` (TRL logs these two as
`logps/chosen` / `logps/rejected`), and `kl`: the per-token mean of log π − log π_ref (as dpo.py).
Departures from TRL: none in the loss; metric names as listed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.common import masked_mean, masked_sum


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mixture_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mixture_coef: float = 0.5) -> torch.Tensor:
    """Log-probs (..., V) of the geometric mixture π^(1−c)·π_ref^c, renormalised over the last dim."""
    if not 0.0 <= mixture_coef <= 1.0:
        raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"policy and reference logits differ in shape: {tuple(policy_logits.shape)} vs "
                         f"{tuple(ref_logits.shape)}")
    logp = F.log_softmax(_at_least_fp32(policy_logits), dim=-1)
    logq = F.log_softmax(_at_least_fp32(ref_logits), dim=-1)
    return F.log_softmax((1.0 - mixture_coef) * logp + mixture_coef * logq, dim=-1)


def preference_probability(policy_scores: torch.Tensor, mixture_scores: torch.Tensor) -> torch.Tensor:
    """P(y ≻ y') = σ(r(y) − r(y')) from reward-model scores (Bradley–Terry), TRL's reward-model path."""
    return torch.sigmoid(_at_least_fp32(policy_scores) - _at_least_fp32(mixture_scores))


def nash_md_loss(policy_logps, ref_logps, mask, preference, beta: float = 0.1):
    """policy_logps/ref_logps/mask (N, T) on the POLICY's completions, preference (N,) = P(y ≻ y').

    Returns (loss, metrics).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != mask.shape:
        raise ValueError(f"policy_logps, ref_logps and mask must share one (N, T) shape, got "
                         f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(mask.shape)}")
    preference = torch.as_tensor(preference, dtype=policy_logps.dtype, device=policy_logps.device)
    if preference.shape != policy_logps.shape[:1]:
        raise ValueError(f"preference must be (N,) = ({policy_logps.shape[0]},), got {tuple(preference.shape)}")
    if bool(((preference < 0) | (preference > 1)).any()):
        raise ValueError("preference holds probabilities P(policy sample beats mixture sample): every value must be in [0, 1]")
    mask = mask.to(policy_logps.dtype)

    seq_logp = masked_sum(policy_logps, mask, -1)
    score = (preference - 0.5) * seq_logp
    log_ratio = (policy_logps - ref_logps).detach()
    kl_term = masked_sum(log_ratio * policy_logps, mask, -1)
    loss = (beta * kl_term - score).mean()

    with torch.no_grad():
        seq_ref = masked_sum(ref_logps, mask, -1)
        margin = seq_logp - seq_ref
        metrics = {
            "loss": loss.detach(),
            "loss/score": score.mean(),
            "loss/kl": masked_sum(log_ratio, mask, -1).mean(),
            "rewards/probabilities": preference.mean(),
            "rewards/margins": margin.mean(),
            "rewards/accuracies": (margin > 0).to(margin.dtype).mean(),
            "objective/entropy": (-seq_logp).mean(),
            "logps/policy": seq_logp.mean(),
            "logps/ref": seq_ref.mean(),
            "kl": masked_mean(log_ratio, mask),
        }
    return loss, metrics
