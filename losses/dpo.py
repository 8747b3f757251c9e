"""Direct Preference Optimization and its pairwise relatives: cDPO, robust DPO, IPO, hinge (SLiC).

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290). With the implicit reward log-ratio
    h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]
and z = β·h, the per-pair losses are (β = 0.1 by default, as in TRL):

    sigmoid  −(1−ε)·log σ(z) − ε·log σ(−z)                  DPO; with ε > 0 "conservative DPO"
             (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf): the BCE against soft labels
             1−ε / ε, so the optimum sits at the finite margin z = log((1−ε)/ε). 0 ≤ ε ≤ 0.5.
    robust   [−(1−ε)·log σ(z) + ε·log σ(−z)] / (1−2ε)       robust DPO (Chowdhury et al. 2024,
             https://arxiv.org/abs/2403.00409): an unbiased estimate of the clean DPO loss when a
             share ε of the labels is flipped. Not bounded below (−ε·z/(1−2ε) as z → ∞): the loss
             keeps pushing the margin, it only de-weights pairs that look flipped. 0 ≤ ε < 0.5.
    hinge    max(0, 1 − z)                                  SLiC-style (Zhao et al. 2023,
             https://arxiv.org/abs/2305.10425), margin 1/β in log-ratio units.
    ipo      (h − 1/(2β))²                                  IPO (Azar et al. 2023,
             https://arxiv.org/abs/2310.12036), β plays the paper's τ; regress the margin onto
             1/(2β) instead of pushing it to infinity.

ε = label_smoothing (default 0). Both formulas are TRL's `loss_type` "sigmoid" / "robust"; with
ε = 0 they are the plain DPO loss. hinge and ipo take no ε (passing one is an error).

RPO (Pang et al. 2024, Iterative Reasoning Preference Optimization, https://arxiv.org/abs/2404.19733):
with α = rpo_alpha > 0 the loss gains α·NLL(y_c), the negative log-likelihood of the chosen
completions as a per-token mean over every chosen token of the batch (TRL's loss_type
["sigmoid", "sft"] with loss_weights [1, α]). DPO only moves the margin, so on pairs whose rejected
answers all lie on one side of the chosen one it can lower both and shift the answer past the right
value; the NLL term holds the chosen answer up. α = 0 (default) is plain DPO; the paper uses α = 1.

Normalisers. Sequence log-probs are sums over completion tokens (masked_sum, prompt and padding
excluded), except for ipo, which uses per-token means (masked_mean) as IPO and TRL do, so IPO is
invariant to completion length. The loss is the mean over pairs.

Metrics (detached, batch means; the names TRL logs): `rewards/chosen` = β·(log π − log π_ref)(y_c),
`rewards/rejected`, `rewards/margins`, `rewards/accuracies` (share of pairs with chosen reward
strictly above rejected), `logps/chosen`, `logps/rejected` (policy sequence log-probs), all built on
the same sequence log-probs as the loss (so per-token means under ipo, as TRL). `kl`: per-token
estimate of KL(π‖π_ref), the mean of log π − log π_ref over every completion token of chosen and
rejected (a k1 estimate on off-policy data: a drift monitor, not an exact KL).
Departures from TRL: none in the loss; `kl` is ours (TRL's DPO logs no KL).
"""
from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F

from losses.common import masked_mean, masked_sum

LossType = Literal["sigmoid", "robust", "hinge", "ipo"]
LOSS_TYPES = typing.get_args(LossType)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_mask, rejected_mask, beta: float = 0.1, loss_type: LossType = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: float = 0.0):
    """All inputs (B, T): per-token log-probs and 0/1 completion masks. Returns (loss, metrics)."""
    eps = label_smoothing
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type in ("hinge", "ipo") and eps != 0:
        raise ValueError(f"label_smoothing={eps} has no meaning for loss_type={loss_type!r} (use sigmoid or robust)")
    if loss_type == "sigmoid" and not 0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for cDPO, got {eps}")
    if loss_type == "robust" and not 0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust DPO, got {eps}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0 (0 = plain DPO), got {rpo_alpha}")
    if loss_type == "ipo" and beta <= 0:
        raise ValueError(f"ipo needs beta > 0 (its target margin is 1/(2*beta)), got {beta}")

    cm = chosen_mask.to(policy_chosen_logps.dtype)
    rm = rejected_mask.to(policy_rejected_logps.dtype)
    seq = masked_mean if loss_type == "ipo" else masked_sum  # the sequence log-prob
    pi_c, pi_r = seq(policy_chosen_logps, cm, -1), seq(policy_rejected_logps, rm, -1)
    ref_c, ref_r = seq(ref_chosen_logps, cm, -1), seq(ref_rejected_logps, rm, -1)
    h = (pi_c - ref_c) - (pi_r - ref_r)
    z = beta * h

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    nll = -(policy_chosen_logps * cm).sum() / cm.sum().clamp(min=1)
    if rpo_alpha:
        loss = loss + rpo_alpha * nll

    with torch.no_grad():
        r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (pi_c - ref_c > pi_r - ref_r).to(r_c.dtype).mean(),  # unscaled: defined at beta=0
            "logps/chosen": pi_c.mean(),
            "logps/rejected": pi_r.mean(),
            "nll_loss": nll.detach(),
            "kl": (masked_sum(policy_chosen_logps - ref_chosen_logps, cm)
                   + masked_sum(policy_rejected_logps - ref_rejected_logps, rm)) / (cm.sum() + rm.sum()).clamp(min=1),
        }
    return loss, metrics
