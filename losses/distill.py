"""Distillation from a teacher on the student's own samples: on-policy distillation (OPD) and GKD.

Both train the student on completions IT sampled, so it learns to recover from its own mistakes
instead of imitating teacher text it would never produce (the exposure bias of SFT on teacher data).
They differ in what the teacher gives back per position.

1. On-policy distillation with a sampled-token reverse KL (`opd_loss`; Thinking Machines,
   "On-Policy Distillation", Lu et al. 2025, https://thinkingmachines.ai/blog/on-policy-distillation/,
   after Qwen3's strong-to-weak distillation, https://arxiv.org/abs/2505.09388). The teacher scores only
   the sampled tokens, log π_t(o_t); the per-token reverse KL estimate is a dense negative reward:
       A_t = −coef · (log π_old(o_t) − log π_t(o_t))          detached; π_old = the sampling student
       r_t = exp(log π(o_t) − log π_old(o_t))
       L   = −Σ_t r_t · A_t / n_tokens                         (the importance-sampling surrogate)
       ∇   = −Σ_t r_t · A_t · ∇log π(o_t) / n_tokens
   Discount 0: each token is scored only by its own KL term (the write-up's choice: a discounted sum
   over later tokens is "more correct" but did not help them). At r = 1 the expected gradient over
   o_t ~ π is exactly ∇KL(π‖π_t) at that position (tested exactly, by enumerating a small vocabulary).
   Defaults: coef = 1.0 (the Tinker cookbook's kl_penalty_coef). Normaliser: token sum /
   num_items_in_batch, the completion tokens of the whole generation batch (default: this call's).
   `opd_advantages` returns A alone, (N, T), to add to a task advantage and hand to a per-token policy
   loss (cispo_loss, gspo_loss with (N, T) advantages).
   Departures: the write-up's Tinker `importance_sampling` loss is a plain token SUM (scale left to the
   learning rate); here it is divided by the token count, like every token-level loss in this project.
   TRL 1.16 has no loss of exactly this form (its DistillationTrainer, GKD and server distillation
   match full or top-k distributions); its experimental IW-OPD trainer with iw_opd_gamma = 0 uses the
   same advantage in a REINFORCE loss −A·log π, whose gradient equals this one at r = 1 (tested).
   Metrics: `reverse_kl` the mean over completion tokens of log π_old − log π_t (the per-token k1
   estimate of KL(student‖teacher) on the sampled tokens), `ratio_mean`.

2. GKD: generalised Jensen–Shannon divergence over the FULL token distributions (Agarwal et al. 2024,
   "On-Policy Distillation of Language Models", https://arxiv.org/abs/2306.13649, Eq. 1), at every
   completion position, with p_s = softmax(z_s/T), p_t = softmax(z_t/T), m = β·p_t + (1 − β)·p_s:
       JSD_β = β · KL(p_t ‖ m) + (1 − β) · KL(p_s ‖ m)
       β = 0: KL(p_t ‖ p_s), forward KL     β = 1: KL(p_s ‖ p_t), reverse KL
   JSD_β itself vanishes at both ends; the two end points are the limits of JSD_β/β and JSD_β/(1 − β)
   (TRL's special cases, tested as limits). Normaliser: sum over completion positions /
   num_items_in_batch (default: this call's count), TRL's "batchmean" over valid tokens.
   Defaults: β = 0.5, T = 1.0. TRL's GKD defaults are λ = 0.5, β = 0.5, temperature 0.9, but in
   GKDTrainer 0.9 is the SAMPLING temperature: its loss calls generalized_jsd_loss at T = 1. λ (the
   share of batches replaced by student samples) is a feed decision, not part of the loss. Qwen3's
   on-policy stage (align the student's logits with the teacher's on student samples, minimising KL) is
   gkd_loss with β = 1 on student samples.

   Memory: the loss needs both models' full distributions, so `gkd_loss` takes the final hidden states
   and lm_head weights and never holds more than `chunk_tokens` positions' logits: only the masked
   positions are gathered (n × H per model), and each chunk is projected, compared and dropped. Each
   chunk runs under activation checkpointing (torch.utils.checkpoint, non-reentrant), so backward
   recomputes one chunk at a time and nothing of size n × V is ever kept: working memory is about ten
   chunk × V fp32 buffers (≈ 10 · chunk_tokens · V · 4 bytes; the default chunk_tokens =
   CHUNK_ELEMENTS // (4·V), ≈ 110 positions for a 152k vocabulary, ≈ 0.7 GB), independent of n.
   Cost: each chunk's two projections run twice (forward and recompute) plus the student's backward.
   `generalized_jsd` is the per-row function for callers that already hold (N, V) rows of logits or
   log-probs (the same result: log_softmax ignores a per-row shift).
   Departures: none from the paper's JSD_β or TRL's generalized_jsd_loss / DistillationTrainer's
   chunked divergence (loss and gradient equal, tests/test_trl_equality.py). No top-k teacher logits,
   no logit soft-capping (the project's models have none).
   Metrics (detached, means over completion positions of the full-distribution divergences):
   `jsd`, `reverse_kl` = KL(p_s‖p_t) (the teacher reverse KL per token), `forward_kl` = KL(p_t‖p_s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from losses.common import CHUNK_ELEMENTS, masked_mean, masked_sum, token_normaliser


def _check_shapes(logps, mask, **others):
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps and mask must both be (N, T), got {tuple(logps.shape)} and {tuple(mask.shape)}")
    for name, x in others.items():
        if x is not None and x.shape != logps.shape:
            raise ValueError(f"{name} must be (N, T) = {tuple(logps.shape)} like logps, got {tuple(x.shape)}")


# ---------------------------------------------------------------- 1. sampled-token reverse KL (OPD)

def opd_advantages(old_logps, teacher_logps, mask, coef: float = 1.0) -> torch.Tensor:
    """(N, T) detached per-token advantages −coef·(log π_old − log π_t); 0 off the completion tokens."""
    _check_shapes(old_logps, mask, teacher_logps=teacher_logps)
    if coef < 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    return torch.where(mask.bool(), -coef * (old_logps - teacher_logps), 0.0).detach()


def opd_loss(logps, old_logps, teacher_logps, mask, coef: float = 1.0, num_items_in_batch=None):
    """logps/old_logps/teacher_logps/mask (N, T) on the STUDENT's sampled tokens. Returns (loss, metrics).

    old_logps=None means the first on-policy step (old = logps.detach(), every ratio is 1).
    """
    _check_shapes(logps, mask, old_logps=old_logps, teacher_logps=teacher_logps)
    if old_logps is None:
        old_logps = logps.detach()
    keep = mask.bool()
    mask = mask.to(logps.dtype)
    adv = opd_advantages(old_logps, teacher_logps, mask, coef).to(logps.dtype)
    ratio = torch.exp(torch.where(keep, logps - old_logps, 0.0))
    loss = masked_sum(-ratio * adv, mask) / token_normaliser(num_items_in_batch, mask.sum())
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "reverse_kl": masked_mean(torch.where(keep, old_logps - teacher_logps, 0.0), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


# ---------------------------------------------------------------- 2. GKD: JSD_β over full distributions

def _jsd(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """(N, V) log-probs -> (N,) JSD_β(p_s, p_t), with TRL's end points (forward / reverse KL)."""
    if beta == 0.0:
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if beta == 1.0:
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
    return beta * (logp_t.exp() * (logp_t - log_m)).sum(-1) + (1 - beta) * (logp_s.exp() * (logp_s - log_m)).sum(-1)


def _log_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # the softmax in at least fp32
    return F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _check_beta_temperature(beta: float, temperature: float):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) logits (or log-probs) of student and teacher at the same N positions -> (N,) JSD_β."""
    _check_beta_temperature(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher rows differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    return _jsd(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature), beta)


def _chunk(h_s, w_s, h_t, w_t, beta: float, temperature: float):
    """One chunk of positions: (c,) JSD_β with gradient, and (c, 2) detached [reverse KL, forward KL]."""
    logp_s = _log_softmax(h_s @ w_s.t(), temperature)
    with torch.no_grad():
        logp_t = _log_softmax(h_t @ w_t.t(), temperature)
    div = _jsd(logp_s, logp_t, beta)
    with torch.no_grad():
        kls = torch.stack([_jsd(logp_s, logp_t, 1.0), _jsd(logp_s, logp_t, 0.0)], dim=-1)
    return div, kls


def gkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, beta: float = 0.5,
             temperature: float = 1.0, num_items_in_batch=None, chunk_tokens: int | None = None):
    """GKD's JSD_β at the masked positions. Returns (loss, metrics).

    student_hidden (..., H_s) and teacher_hidden (..., H_t): final hidden states at the same positions
    (position t predicting token t + 1, as losses/common.py's sequence_logprobs aligns them);
    student_weight (V, H_s), teacher_weight (V, H_t): the lm_head weights (one vocabulary);
    mask (...): 1 on completion positions. The teacher never receives a gradient.
    """
    _check_beta_temperature(beta, temperature)
    if student_hidden.shape[:-1] != mask.shape or teacher_hidden.shape[:-1] != mask.shape:
        raise ValueError(f"hidden states must be mask.shape + (H,) = {tuple(mask.shape)} + (H,), got student "
                         f"{tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs {teacher_weight.shape[0]}")
    if student_weight.shape[1] != student_hidden.shape[-1] or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"lm_head weights must be (V, H) matching the hidden sizes, got student "
                         f"{tuple(student_weight.shape)} for H={student_hidden.shape[-1]}, teacher "
                         f"{tuple(teacher_weight.shape)} for H={teacher_hidden.shape[-1]}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    sel = mask.bool()
    h_s = student_hidden[sel]
    h_t = teacher_hidden[sel].detach()
    w_t = teacher_weight.detach()
    n = h_s.shape[0]
    if n == 0:  # nothing to distil: a zero that is still in the graph
        loss = (student_hidden.sum() * 0 + student_weight.sum() * 0).float()
        zero = loss.detach()
        return loss, {"loss": zero, "jsd": zero, "reverse_kl": zero, "forward_kl": zero}
    c = chunk_tokens or max(1, CHUNK_ELEMENTS // (4 * student_weight.shape[0]))
    divs, kls = [], []
    for i in range(0, n, c):
        d, k = checkpoint(_chunk, h_s[i:i + c], student_weight, h_t[i:i + c], w_t, beta, temperature,
                          use_reentrant=False)
        divs.append(d)
        kls.append(k)
    div = torch.cat(divs)
    loss = div.sum() / token_normaliser(num_items_in_batch, sel.sum().to(div.dtype))
    with torch.no_grad():
        kl = torch.cat(kls).mean(0)
        metrics = {"loss": loss.detach(), "jsd": div.mean(), "reverse_kl": kl[0], "forward_kl": kl[1]}
    return loss, metrics


opd_loss.normaliser = "batch"  # divided by num_items_in_batch: the whole batch's completion tokens (trainer/feeds)
gkd_loss.normaliser = "batch"  # divided by num_items_in_batch: the whole batch's completion tokens (trainer/feeds)
