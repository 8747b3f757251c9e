"""Reward models: a scalar head on the transformer, trained with the Bradley–Terry pairwise loss.

Model. `RewardHead` is one `Linear(hidden, 1, bias=False)` named `score`, exactly HF's
`*ForSequenceClassification` head with num_labels=1, so backbone + head save as a state dict with
`model.*` and `score.weight` keys that `AutoModelForSequenceClassification` loads. The reward of a
sequence is the head applied to the final hidden state at its LAST REAL token (`sequence_rewards`,
found from attention_mask, so right and left padding both work; HF finds it from the first pad id).

Loss (Bradley–Terry; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; TRL's RewardTrainer):
    loss = mean over pairs of −log σ(r_c − r_r − m)  +  c · mean((r_c + r_r)²)
    m = margin (per pair, optional; Llama 2's margin loss, https://arxiv.org/abs/2307.09288): a pair
        rated "much better" must be separated by at least m before the loss relaxes.
    c = center_rewards_coefficient (optional, TRL default None; Eisenstein et al. 2023,
        https://arxiv.org/abs/2312.09244 suggest 0.01): BT only sees differences, so the absolute level
        drifts; the penalty pulls r_c + r_r towards 0, giving rewards a usable zero point.
Normaliser: mean over pairs (both terms).
Metrics (detached): `accuracy` (share of pairs with r_c > r_r strictly; TRL's eval accuracy),
`margin` (mean r_c − r_r, margin argument not subtracted), `rewards/chosen`, `rewards/rejected`.
Departures from TRL: none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RewardHead(nn.Module):
    """Scalar reward from a hidden state: `score` = Linear(hidden_size, 1, bias=False), HF naming."""

    def __init__(self, hidden_size: int, dtype=None, device=None):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...) rewards."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last 1 in each row of attention_mask (left or right padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        raise ValueError("every sequence needs at least one real token (a row of attention_mask is all 0)")
    T = attention_mask.shape[1]
    return T - 1 - real.flip(-1).int().argmax(-1)


def sequence_rewards(model, head: RewardHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) rewards: `head` on the final hidden state of each sequence's last real token."""
    left_padded = bool((attention_mask[:, 0] == 0).any())
    # right padding runs the fast causal kernel: no real token ever sees a pad (model/transformer.py)
    hidden = model(input_ids, attention_mask=attention_mask if left_padded else None, hidden_only=True)
    idx = last_token_index(attention_mask).to(hidden.device)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return head(last)


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin=None,
                center_rewards_coefficient: float | None = None):
    """Bradley–Terry loss on (B,) chosen / rejected rewards. Returns (loss, metrics)."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"chosen and rejected rewards must both be (B,), got {tuple(chosen_rewards.shape)} "
                         f"and {tuple(rejected_rewards.shape)}")
    diff = chosen_rewards - rejected_rewards
    z = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    loss = -F.logsigmoid(z).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "accuracy": (diff > 0).to(diff.dtype).mean(),
            "margin": diff.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
        }
    return loss, metrics
