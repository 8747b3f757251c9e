"""Supervised fine-tuning (and pretraining): the negative log-likelihood of the trained tokens.

    loss = - Σ_t m_t log π(y_t | y_<t) / Σ_t m_t

m is the loss mask: completion tokens for SFT (never prompt or padding), every real token for
pretraining. Normaliser: per token over the whole (micro-)batch, as TRL's SFTTrainer and
torchtune do by default, so long answers weigh more than short ones. Perplexity = exp(loss).
"""
from __future__ import annotations

import torch

from losses.common import masked_mean


def sft_loss(logp: torch.Tensor, mask: torch.Tensor):
    """logp, mask: (B, T) token log-probs and 0/1 loss mask. Returns (loss, metrics)."""
    nll = masked_mean(-logp, mask)
    return nll, {"loss": nll.detach(), "trained_tokens": mask.sum().detach()}
