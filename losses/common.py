"""The shared pieces every loss uses: masked reductions and chunked token log-probs.

`masked_sum` / `masked_mean` are the only reductions in losses/: a loss states its normaliser
(per token, per sequence, per group) by which of them it calls and over which dimension.

`token_logprobs` gathers log p(label) from the final hidden states without ever holding the
batch x length x vocab fp32 logits: tokens are projected in chunks, a custom autograd function keeps
only the log-normaliser per token, and backward rebuilds each chunk's softmax and writes the
gradient onehot − softmax directly (no autograd graph over the logits). With a 150k vocabulary that
is the difference between gigabytes and a few hundred megabytes.
"""
from __future__ import annotations

import torch

# ~64M fp32 logits (256 MB) per chunk at most
CHUNK_ELEMENTS = 2**26


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of x where mask is 1 (over `dim`, or everything)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1; 0 where the mask is empty (never NaN)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def token_normaliser(num_items_in_batch, count: torch.Tensor):
    """What a token-sum loss divides by: the whole generation batch's completion tokens when the feed
    gives them (`num_items_in_batch`, so micro-batch losses add up to one token mean), else this call's
    `count`; never below 1."""
    if num_items_in_batch is None:
        num_items_in_batch = count
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(count.dtype).clamp(min=1)
    return max(float(num_items_in_batch), 1.0)


def policy_inputs(logps, old_logps, advantages, mask, token_advantages: bool = True):
    """The checked, aligned inputs of a clipped policy-gradient loss -> (old_logps, keep, mask, adv).

    logps/old_logps/mask (N, T); advantages (N,) per completion, or (N, T) per token when
    `token_advantages`. old_logps=None means the first on-policy step (old = logps.detach()).
    adv is (N, 1) or (N, T) with padding zeroed; mask is in logps' dtype and keep is its bool.
    """
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps and mask must both be (N, T), got {tuple(logps.shape)} and {tuple(mask.shape)}")
    shapes = (logps.shape[:1], logps.shape) if token_advantages else (logps.shape[:1],)
    if advantages.shape not in shapes:
        raise ValueError(f"advantages must be {' or '.join(str(tuple(x)) for x in shapes)}, got {tuple(advantages.shape)}")
    old_logps = logps.detach() if old_logps is None else old_logps
    keep = mask.bool()
    adv = advantages.to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else torch.where(keep, adv, 0.0)  # padding may hold anything
    return old_logps, keep, mask.to(logps.dtype), adv


def _chunk_logits(h, weight, temperature: float):
    logits = h @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least fp32
    return logits / temperature if temperature != 1.0 else logits


class _TokenLogprobs(torch.autograd.Function):
    """log p(label) per row of h (N, H) under softmax(h W^T / T), chunked over rows.

    Forward keeps, per chunk, only logz (N,) — or, when everything fits in one chunk, the softmax
    itself (in the logits' own buffer, within the CHUNK_ELEMENTS budget). Backward rebuilds each
    chunk's softmax and applies d logp / d logits = onehot(label) − softmax directly, so no autograd
    graph of the N x V logits is ever kept and the lm_head matmul is recomputed at most once.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, temperature, chunk, with_entropy):
        logps, logzs, ents, probs = [], [], [], None
        single = h.shape[0] <= chunk
        for i in range(0, h.shape[0], chunk):
            logits = _chunk_logits(h[i:i + chunk], weight, temperature)
            logz = logits.logsumexp(-1)
            logps.append(logits.gather(-1, labels[i:i + chunk, None]).squeeze(-1) - logz)
            logzs.append(logz)
            p = logits.sub_(logz[:, None]).exp_()  # softmax, in place of the logits
            if with_entropy:  # H = -sum p log p, with log p = log(p) read back from the buffer
                ents.append(-(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1))
            if single:
                probs = p
        ctx.save_for_backward(h, weight, labels, torch.cat(logzs))
        ctx.probs, ctx.temperature, ctx.chunk = probs, temperature, chunk
        logp = torch.cat(logps)
        ent = torch.cat(ents) if with_entropy else logp.new_zeros(())
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        h, weight, labels, logz = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) if ctx.needs_input_grad[1] else None
        c = ctx.chunk
        for i in range(0, h.shape[0], c):
            hc = h[i:i + c]
            if ctx.probs is not None:
                p = ctx.probs
            else:
                p = _chunk_logits(hc, weight, ctx.temperature).sub_(logz[i:i + c, None]).exp_()
            gc = g[i:i + c].to(p.dtype)
            grad = p.mul_(-gc[:, None])  # d/dlogits of g * (logits[label] - logz) = g * (onehot - p)
            grad.scatter_add_(-1, labels[i:i + c, None], gc[:, None])
            if ctx.temperature != 1.0:
                grad = grad / ctx.temperature
            if grad_h is not None:
                grad_h[i:i + c] = (grad.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += grad.t() @ hc.to(grad.dtype)
        ctx.probs = None
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0, chunk_tokens: int | None = None, with_entropy: bool = False):
    """log p(labels) for hidden (B, T, H) projected by weight (V, H); returns (B, T) fp32.

    With `with_entropy=True` returns (logp, entropy) where entropy is the full-distribution
    entropy per position (a metric: it carries no gradient). Logits never exist for more than
    `chunk_tokens` positions at a time (default: as many as fit in CHUNK_ELEMENTS).
    """
    B, T, H = hidden.shape
    if B * T == 0:  # nothing to score (e.g. every completion masked): empty, but still in the graph
        zero = (hidden.sum(-1) * 0).float()
        return (zero, zero.detach()) if with_entropy else zero
    n = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    logp, ent = _TokenLogprobs.apply(hidden.reshape(-1, H), weight, labels.reshape(-1), float(temperature), n,
                                     with_entropy)
    if with_entropy:
        return logp.view(B, T), ent.view(B, T)
    return logp.view(B, T)


def sequence_logprobs(model, input_ids, loss_mask, attention_mask=None, temperature: float = 1.0,
                      document_ids=None):
    """Per-token log-probs of input_ids[:, 1:] under `model`, and the shifted mask.

    Returns (logp (B, T-1), mask (B, T-1)): position t scores token t+1; mask is loss_mask[:, 1:].
    Only the masked positions are projected onto the vocabulary (prompt and padding tokens never
    reach the head, which on a 150k vocabulary is most of a preference batch's head FLOPs); logp is
    0 elsewhere. attention_mask is only needed for left-padded batches, document_ids for packed
    rows (see model/transformer.py).
    """
    kwargs = {"document_ids": document_ids} if document_ids is not None else {}
    hidden = model(input_ids, attention_mask=attention_mask, hidden_only=True, **kwargs)
    mask = loss_mask[:, 1:]
    sel = mask.bool()
    picked = token_logprobs(hidden[:, :-1][sel][None], model.lm_head_weight, input_ids[:, 1:][sel][None], temperature)
    logp = picked.new_zeros(mask.shape).masked_scatter(sel, picked[0])
    return logp, mask.to(logp.dtype)
