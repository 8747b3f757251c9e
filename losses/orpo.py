"""ORPO: odds-ratio preference optimisation, SFT and preference in one loss, no reference model.

Hong et al. 2024, https://arxiv.org/abs/2403.07691. With p̄(y) = mean over completion tokens of
log π(y_t | x, y_<t) (per-token average log-prob, so exp(p̄) ∈ (0, 1] is a length-normalised
likelihood) and the log-odds  lo(y) = p̄ − log(1 − exp(p̄)):

    loss = NLL_chosen − λ · mean_pairs log σ(lo(y_c) − lo(y_r))           λ = 0.1 (DESIGN, TRL's beta)

NLL_chosen = −Σ m log π / Σ m over all chosen completion tokens of the batch (per-token mean, the
same normaliser as losses/sft.py and TRL's flattened cross-entropy; the paper averages per
sequence first). The odds-ratio term is a mean over pairs.

Numerics: log(1 − exp(p̄)) is computed as log(−expm1(p̄)) near 0 and log1p(−exp(p̄)) further out
(accurate everywhere), with p̄ clamped to ≤ −1e-6 first, because p̄ = 0 (a completion the model is
certain of, common in fp32) would give log 0 = −inf. TRL computes log1p(−exp(p̄)) unclamped.

Metrics (detached; TRL's names and definitions): `nll`; `log_odds_ratio` = mean log σ(lo_c − lo_r)
(TRL's name for the log-sigmoid, not the raw difference); `log_odds_chosen` = mean (lo_c − lo_r);
`rewards/chosen` = λ·p̄(y_c) and `rewards/rejected` (TRL's ORPO reward, β = λ), `rewards/margins`,
`rewards/accuracies` (share of pairs with chosen reward strictly higher); `logps/chosen`,
`logps/rejected` = mean p̄.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.common import masked_mean

MAX_AVG_LOGP = -1e-6  # p̄ is clamped below 0 so log(1 − exp(p̄)) stays finite


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate both near 0 and far below it (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_mask, rejected_mask, lam: float = 0.1):
    """All inputs (B, T): per-token log-probs and 0/1 completion masks. Returns (loss, metrics)."""
    cm = chosen_mask.to(policy_chosen_logps.dtype)
    rm = rejected_mask.to(policy_rejected_logps.dtype)
    avg_c = masked_mean(policy_chosen_logps, cm, -1)
    avg_r = masked_mean(policy_rejected_logps, rm, -1)

    nll = masked_mean(-policy_chosen_logps, cm)
    c, r = avg_c.clamp(max=MAX_AVG_LOGP), avg_r.clamp(max=MAX_AVG_LOGP)
    log_odds = (c - log1mexp(c)) - (r - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = nll - lam * ratio.mean()

    with torch.no_grad():
        r_c, r_r = lam * avg_c, lam * avg_r
        metrics = {
            "loss": loss.detach(),
            "nll": nll.detach(),
            "log_odds_ratio": ratio.mean(),
            "log_odds_chosen": log_odds.mean(),
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (avg_c > avg_r).to(r_c.dtype).mean(),  # unscaled: defined at lam=0
            "logps/chosen": avg_c.mean(),
            "logps/rejected": avg_r.mean(),
        }
    return loss, metrics
