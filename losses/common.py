"""The shared pieces every loss uses: masked reductions and chunked token log-probs.

`masked_sum` / `masked_mean` are the only reductions in losses/: a loss states its normaliser
(per token, per sequence, per group) by which of them it calls and over which dimension.

`token_logprobs` gathers log p(label) from the final hidden states without ever holding the
batch x length x vocab fp32 logits: tokens are projected in chunks, each chunk's logits live only
inside a checkpointed function, and backward recomputes them chunk by chunk. With a 150k
vocabulary that is the difference between gigabytes and a few hundred megabytes.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# ~64M fp32 logits (256 MB) per chunk at most
CHUNK_ELEMENTS = 2**26


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of x where mask is 1 (over `dim`, or everything)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1; 0 where the mask is empty (never NaN)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def _chunk_logprobs(h, weight, labels, temperature: float, with_entropy: bool):
    logits = h @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least fp32
    if temperature != 1.0:
        logits = logits / temperature
    logz = logits.logsumexp(-1)
    logp = logits.gather(-1, labels[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, logp.new_zeros(())
    probs = (logits - logz[:, None]).exp()
    return logp, logz - (probs * logits).sum(-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0, chunk_tokens: int | None = None, with_entropy: bool = False):
    """log p(labels) for hidden (B, T, H) projected by weight (V, H); returns (B, T) fp32.

    With `with_entropy=True` returns (logp, entropy) where entropy is the full-distribution
    entropy per position (useful as an RL metric). Logits never exist for more than
    `chunk_tokens` positions at a time (default: as many as fit in CHUNK_ELEMENTS).
    """
    B, T, H = hidden.shape
    flat_h, flat_y = hidden.reshape(-1, H), labels.reshape(-1)
    n = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    logps, ents = [], []
    for i in range(0, flat_h.shape[0], n):
        args = (flat_h[i:i + n], weight, flat_y[i:i + n], temperature, with_entropy)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(B, T)
    if with_entropy:
        return logp, torch.cat(ents).view(B, T)
    return logp


def sequence_logprobs(model, input_ids, loss_mask, attention_mask=None, temperature: float = 1.0):
    """Per-token log-probs of input_ids[:, 1:] under `model`, and the shifted mask.

    Returns (logp (B, T-1), mask (B, T-1)): position t scores token t+1; mask is loss_mask[:, 1:].
    attention_mask is only needed for left-padded batches (see model/transformer.py).
    """
    hidden = model(input_ids, attention_mask=attention_mask, hidden_only=True)
    logp = token_logprobs(hidden[:, :-1], model.lm_head_weight, input_ids[:, 1:], temperature)
    return logp, loss_mask[:, 1:].to(logp.dtype)
