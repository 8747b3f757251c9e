"""Directions from two sets of activations, one candidate per layer, and picking the layer by effect.

Directions (input: `capture` output, (layers, prompts, positions, hidden) for each set):
  * "mean" (default): difference of means, mean(positive) - mean(negative), over prompts and
    positions (Arditi et al. 2024; CAA). Not normalised: a steering coefficient of 1 moves the
    negative prompts' mean onto the positive prompts' mean at the captured positions.
  * "pca": the top principal direction of the PAIRED differences pos_i - neg_i (RepE-style; the
    two files must be line-by-line pairs, e.g. the same prompt with and without a cue). It is the
    uncentred top singular vector, i.e. the direction that explains most of E[d dᵀ], which keeps
    the shared shift (centring would throw the mean difference away). Its sign is chosen to agree
    with the mean difference and its length is the mean projection of the differences on it, so
    coefficients mean the same thing as for "mean".

Choosing the layer. Each candidate (a layer, and for steering a coefficient) is MEASURED with the
intervention in place, on training prompts (the held-out sets stay for eval.json):
  * rate:  share of greedy generations the judge calls positive (is_refusal / is_styled),
  * score: mean log-odds of the judged behaviour's first tokens at the first answer position,
           log p(B) - log(1 - p(B)), B = first tokens of the refusal markers / the style prefix
           (Arditi et al.'s refusal score),
  * kl:    mean first-token KL(intervened || original) on the KL prompts (harmless prompts).
Abliteration keeps candidates with kl <= max_kl outside the last `skip_last_layers` layers and
takes the lowest (rate, score); steering takes the highest rate, then the gentlest push
(|coefficient| x ||vector||), then the highest score. `format_table` prints every candidate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from evaluation.metrics import generate_texts
from steering.capture import encode_prompts, left_pad


# ----------------------------------------------------------------------------- directions
def _check_pair(pos: torch.Tensor, neg: torch.Tensor) -> None:
    if pos.dim() != 4 or neg.dim() != 4:
        raise ValueError(f"expected activations (layers, prompts, positions, hidden), got {tuple(pos.shape)} "
                         f"and {tuple(neg.shape)}")
    if pos.shape[0] != neg.shape[0] or pos.shape[2:] != neg.shape[2:]:
        raise ValueError(f"activation sets do not match: {tuple(pos.shape)} vs {tuple(neg.shape)} "
                         f"(same layers, positions and width expected)")
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        raise ValueError("empty prompt set: both sets need at least one prompt")


def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(layers, hidden): mean over prompts and positions of pos minus that of neg."""
    _check_pair(pos, neg)
    return pos.float().mean(dim=(1, 2)) - neg.float().mean(dim=(1, 2))


def pca_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(layers, hidden): top uncentred principal direction of the paired differences (see module doc)."""
    _check_pair(pos, neg)
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"direction 'pca' needs paired prompt sets of equal size, got {pos.shape[1]} "
                         f"positive and {neg.shape[1]} negative prompts")
    diffs = (pos.float() - neg.float()).mean(2)            # (L, N, H)
    mean = diffs.mean(1)                                   # (L, H)
    out = []
    for d, m in zip(diffs, mean):
        v = torch.linalg.svd(d, full_matrices=False).Vh[0]
        if v @ m < 0:
            v = -v
        out.append(v * (d @ v).mean())
    return torch.stack(out)


DIRECTIONS = {"mean": mean_difference, "pca": pca_difference}


def compute_directions(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean") -> torch.Tensor:
    if method not in DIRECTIONS:
        raise ValueError(f"direction method {method!r}: expected one of {sorted(DIRECTIONS)}")
    return DIRECTIONS[method](pos, neg)


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def first_token_logprobs(model, tok, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N, V) fp32 CPU log-probs of the first answer token of each chat prompt."""
    ids = encode_prompts(tok, prompts)
    device = model.model.embed_tokens.weight.device
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(ids), batch_size):
            input_ids, mask = left_pad(ids[i:i + batch_size], tok.pad_token_id, device)
            hidden = model(input_ids, attention_mask=mask, hidden_only=True)[:, -1]
            out.append(torch.log_softmax((hidden @ model.lm_head_weight.t()).float(), -1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def first_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Mean over prompts of KL(p || ref) of first-token distributions (the project's KL(pi || pi0) order)."""
    return float((logp.exp() * (logp - ref_logp)).sum(-1).mean())


def log_odds(logp: torch.Tensor, token_ids: list[int]) -> float:
    """Mean log p(B) - log(1 - p(B)), B = token_ids, clamped away from 0 and 1."""
    p = logp[:, token_ids].exp().sum(-1).clamp(1e-6, 1 - 1e-6)
    return float((p.log() - (1 - p).log()).mean())


def first_token_ids(tok, texts) -> list[int]:
    """The first token of each text (as it starts an answer), without duplicates."""
    return list(dict.fromkeys(tok.encode(t)[0] for t in texts if tok.encode(t)))


# ----------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    layer: int
    norm: float                      # ||direction|| before any normalisation
    coefficient: float | None = None  # steering only
    rate: float | None = None
    score: float | None = None
    kl: float | None = None
    skipped: str = ""                # why it cannot be chosen ("" = eligible)
    selected: bool = False

    def row(self) -> dict:
        return asdict(self)


def measure(model, tok, intervene, target_prompts: list[str], judge, marker_ids: list[int],
            kl_prompts: list[str], ref_kl_logp: torch.Tensor, max_new_tokens: int = 12) -> dict:
    """rate, score and kl with `intervene()` (a context manager) in place."""
    with intervene():
        texts = generate_texts(model, tok, target_prompts, max_new_tokens=max_new_tokens)
        score = log_odds(first_token_logprobs(model, tok, target_prompts), marker_ids)
        kl = first_token_kl(first_token_logprobs(model, tok, kl_prompts), ref_kl_logp)
    rate = sum(bool(judge(t)) for t in texts) / len(texts)
    return {"rate": round(rate, 4), "score": round(score, 4), "kl": round(kl, 5)}


def select(cands: list[Candidate], goal: str, max_kl: float | None = None) -> tuple[Candidate, str]:
    """Mark and return the chosen candidate, with a note ("" or why the filters were relaxed).

    goal "remove" (abliteration): lowest (rate, score) among eligible candidates with kl <= max_kl.
    goal "induce" (steering): highest rate, then smallest |coefficient| x norm, then highest score.
    """
    eligible = [c for c in cands if not c.skipped]
    if not eligible:
        raise ValueError("no candidate layer is left to choose from: every layer was skipped "
                         "(lower skip_last_layers or choose other layers)")
    note = ""
    if max_kl is not None:
        passing = [c for c in eligible if c.kl is not None and c.kl <= max_kl]
        if passing:
            for c in eligible:
                if c not in passing:
                    c.skipped = f"kl>{max_kl}"
            eligible = passing
        else:
            note = f"no candidate has kl <= {max_kl}; chose among all eligible layers"
    if goal == "remove":
        best = min(eligible, key=lambda c: (c.rate, c.score))
    elif goal == "induce":
        best = min(eligible, key=lambda c: (-c.rate, abs(c.coefficient or 1.0) * c.norm, -c.score))
    else:
        raise ValueError(f"goal: expected 'remove' or 'induce', got {goal!r}")
    best.selected = True
    return best, note


def format_table(cands: list[Candidate], title: str = "") -> str:
    """A fixed-width table of every candidate; the chosen one is marked with '*'."""
    def f(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [title] if title else []
    lines.append(f"{'':1} {'layer':>5} {'coef':>7} {'norm':>8} {'rate':>7} {'score':>8} {'kl':>9}  note")
    for c in cands:
        lines.append(f"{'*' if c.selected else ' ':1} {c.layer:>5} {f(c.coefficient, '>7.3g')} {c.norm:>8.3f} "
                     f"{f(c.rate, '>7.3f')} {f(c.score, '>8.3f')} {f(c.kl, '>9.5f')}  {c.skipped}")
    return "\n".join(lines)
