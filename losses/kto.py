"""KTO: Kahneman-Tversky optimisation on unpaired completions labelled desirable / undesirable.

Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306. With the implied reward
r(x, y) = log π(y|x) − log π_ref(y|x) (sequence sums over completion tokens) and a reference point

    z0 = max(0, mean_j [log π(y'_j|x_j) − log π_ref(y'_j|x_j)])          detached

estimated on mismatched pairs (prompt x_j with the completion y'_j of another example, built by the
caller and passed as kl_*), the per-example loss is

    desirable    λ_D · (1 − σ(β·(r − z0)))
    undesirable  λ_U · (1 − σ(β·(z0 − r)))

and the loss is the mean over all B examples (TRL: nanmean of the concatenated weighted losses,
the same number). Defaults β = 0.1, λ_D = λ_U = 1 (TRL). The paper suggests choosing the weights
so that λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] when the classes are imbalanced.

z0 is a batch estimate of KL(π‖π_ref): it is clamped at 0 (a KL is never negative, the raw
estimate can be) and carries no gradient (the paper and TRL both treat it as a constant: it only
sets the reference point). kl_policy_logps=None means no estimate: z0 = 0 (TRL's "apo" variants).
TRL all-reduces z0 across data-parallel ranks; this function sees one (micro-)batch.

Metrics (detached): `kl` = z0; `rewards/chosen` = mean β·r over desirable examples,
`rewards/rejected` over undesirable ones (0, not NaN, when a group is empty in the batch),
`rewards/margins` = their difference; `logps/chosen`, `logps/rejected` likewise for the policy
sequence log-probs; `count/chosen`, `count/rejected` (to re-weight when averaging over batches).
"""
from __future__ import annotations

import torch

from losses.common import masked_mean, masked_sum


def kto_loss(policy_logps, ref_logps, mask, labels, kl_policy_logps, kl_ref_logps, kl_mask, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """policy_logps, ref_logps, mask: (B, T); labels: (B,) bool, True = desirable;
    kl_*: (B', T) per-token log-probs and mask of the mismatched pairs. Returns (loss, metrics)."""
    m = mask.to(policy_logps.dtype)
    r = masked_sum(policy_logps, m, -1) - masked_sum(ref_logps, m, -1)

    with torch.no_grad():  # the reference point is a constant
        if kl_policy_logps is None:
            z0 = r.new_zeros(())
        else:
            km = kl_mask.to(kl_policy_logps.dtype)
            z0 = (masked_sum(kl_policy_logps, km, -1) - masked_sum(kl_ref_logps, km, -1)).mean().clamp(min=0)

    desirable = labels.to(torch.bool)
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    loss = losses.mean()

    with torch.no_grad():
        d, u = desirable.to(r.dtype), (~desirable).to(r.dtype)
        rewards = beta * r
        seq = masked_sum(policy_logps, m, -1)
        r_c, r_r = masked_mean(rewards, d), masked_mean(rewards, u)
        metrics = {
            "loss": loss.detach(),
            "kl": z0,
            "rewards/chosen": r_c,
            "rewards/rejected": r_r,
            "rewards/margins": r_c - r_r,
            "logps/chosen": masked_mean(seq, d),
            "logps/rejected": masked_mean(seq, u),
            "count/chosen": d.sum(),
            "count/rejected": u.sum(),
        }
    return loss, metrics
