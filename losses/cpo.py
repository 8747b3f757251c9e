"""CPO: contrastive preference optimisation, DPO without a reference model plus an NLL anchor.

Xu et al. 2024, https://arxiv.org/abs/2401.08417 (Eq. 3 + the behaviour-cloning term). With
h = log π(y_c|x) − log π(y_r|x) and z = β·h:

    loss = mean_pairs ℓ(h) + α · NLL_chosen                        β = 0.1, α = 1.0 (TRL's cpo_alpha)

    sigmoid  ℓ = −(1−ε)·log σ(z) − ε·log σ(−z)     the paper's loss; ε = label_smoothing (cDPO-style
                                                   soft labels, as TRL), 0 ≤ ε ≤ 0.5
    hinge    ℓ = max(0, 1 − z)                     SLiC-style margin 1/β
    ipo      ℓ = (h − 1/(2β))²                     IPO's squared loss on length-normalised log-probs

Normalisers: sequence log-probs are sums over completion tokens (ipo: per-token means, as TRL);
NLL_chosen = −Σ m log π / Σ m over all chosen completion tokens of the batch (per-token mean, as
losses/sft.py and TRL's flattened cross-entropy); ℓ is averaged over pairs. hinge and ipo take no
ε (passing one is an error). SimPO (length-normalised, with a target margin) is losses/simpo.py;
CPO-SimPO is simpo_loss plus α·NLL_chosen.

Metrics (detached, batch means; TRL's names): `rewards/chosen` = β·log π(y_c) (the reference-free
reward, same sequence log-prob as the loss), `rewards/rejected`, `rewards/margins`,
`rewards/accuracies` (share of pairs with h > 0), `logps/chosen`, `logps/rejected`, `nll`.
"""
from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F

from losses.common import masked_mean, masked_sum

LossType = Literal["sigmoid", "hinge", "ipo"]
LOSS_TYPES = typing.get_args(LossType)


def cpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_mask, rejected_mask, beta: float = 0.1,
             loss_type: LossType = "sigmoid", label_smoothing: float = 0.0, alpha: float = 1.0):
    """All inputs (B, T): per-token log-probs and 0/1 completion masks. Returns (loss, metrics)."""
    eps = label_smoothing
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"cpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type != "sigmoid" and eps != 0:
        raise ValueError(f"label_smoothing={eps} has no meaning for loss_type={loss_type!r} (use sigmoid)")
    if not 0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
    if loss_type == "ipo" and beta <= 0:
        raise ValueError(f"ipo needs beta > 0 (its target margin is 1/(2*beta)), got {beta}")

    cm = chosen_mask.to(policy_chosen_logps.dtype)
    rm = rejected_mask.to(policy_rejected_logps.dtype)
    seq = masked_mean if loss_type == "ipo" else masked_sum
    pi_c, pi_r = seq(policy_chosen_logps, cm, -1), seq(policy_rejected_logps, rm, -1)
    h = pi_c - pi_r
    z = beta * h

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    nll = masked_mean(-policy_chosen_logps, cm)
    loss = losses.mean() + alpha * nll

    with torch.no_grad():
        r_c, r_r = beta * pi_c, beta * pi_r
        metrics = {
            "loss": loss.detach(),
            "nll": nll.detach(),
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (pi_c > pi_r).to(r_c.dtype).mean(),
            "logps/chosen": pi_c.mean(),
            "logps/rejected": pi_r.mean(),
        }
    return loss, metrics
