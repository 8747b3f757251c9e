"""SimPO: simple preference optimisation with a length-normalised, reference-free reward.

Meng, Xia & Chen 2024, https://arxiv.org/abs/2405.14734. With p̄(y) = mean over completion
tokens of log π(y_t | x, y_<t) and Δavg = p̄(y_c) − p̄(y_r):

    loss = mean_pairs [ −(1−ε)·log σ(β·Δavg − γ) − ε·log σ(−(β·Δavg − γ)) ]

ε = label_smoothing (default 0: the paper's Eq. 6; ε > 0 is TRL's cDPO-style smoothing).
Defaults β = 2.0, γ = 0.5. β = 2.0 is the paper's value for its base-model runs and the official
repo's default (TRL's CPOConfig default β = 0.1 is CPO's, not a SimPO recommendation); γ = 0.5 is
the DESIGN value (also torchtune's SimPOLoss default).

How γ maps across implementations (all give the same loss for the same margin):
- here and in the paper: γ is the target reward margin in reward units, −log σ(β·Δavg − γ).
- TRL (CPOTrainer, loss_type="simpo"): `simpo_gamma` IS this γ; the code subtracts
  simpo_gamma/β from Δavg before multiplying by β, which is the same thing. simpo_gamma = 0.5.
- official repo (princeton-nlp/SimPO): the knob is now `gamma_beta_ratio` = γ/β (default 0.25;
  0.5 in its Llama-3-Base config, i.e. γ = 1.0 at β = 2); its first configs set `gamma` (the margin
  itself, e.g. 1.6 for Mistral-Base). Our defaults β=2, γ=0.5 equal the repo's dataclass defaults
  β=2, gamma_beta_ratio=0.25.
So γ shifts the margin: the loss at γ equals the loss at γ = 0 with Δavg lowered by γ/β.

Normaliser: per-token means within each sequence (masked_mean over the completion), then the mean
over pairs. Metrics (detached, batch means; TRL's names): `rewards/chosen` = β·p̄(y_c),
`rewards/rejected`, `rewards/margins`, `rewards/accuracies` (share of pairs with Δavg > 0, i.e.
before the margin γ), `logps/chosen`, `logps/rejected` (mean p̄).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.common import masked_mean


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_mask, rejected_mask, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0):
    """All inputs (B, T): per-token log-probs and 0/1 completion masks. Returns (loss, metrics)."""
    eps = label_smoothing
    if not 0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
    cm = chosen_mask.to(policy_chosen_logps.dtype)
    rm = rejected_mask.to(policy_rejected_logps.dtype)
    avg_c = masked_mean(policy_chosen_logps, cm, -1)
    avg_r = masked_mean(policy_rejected_logps, rm, -1)

    z = beta * (avg_c - avg_r) - gamma
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    loss = losses.mean()

    with torch.no_grad():
        r_c, r_r = beta * avg_c, beta * avg_r
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": (avg_c > avg_r).to(r_c.dtype).mean(),
            "logps/chosen": avg_c.mean(),
            "logps/rejected": avg_r.mean(),
        }
    return loss, metrics
