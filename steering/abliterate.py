"""Abliteration: remove a direction from the weights, so the model runs without hooks.

Arditi et al. (2024), "Refusal in Language Models Is Mediated by a Single Direction": ablating the
refusal direction r̂ at run time is the same as orthogonalising every matrix that writes into the
residual stream against r̂. Here that is `embed_tokens` and, in every layer, `self_attn.o_proj`
and `mlp.down_proj` (the only modules whose outputs are added to the stream):

    o_proj / down_proj   W (hidden x in) <- W - w_l r̂ (r̂ᵀ W)      bias b <- b - w_l (r̂·b) r̂
    embed_tokens         E (vocab x hidden): every row e <- e - w_e (e·r̂) r̂

with w = 1 by default (the component is removed exactly; `orthogonal_residual` checks it) and an
optional weight per layer (`layer_weights`, 0 leaves a layer alone). The arithmetic is done in
fp32 and cast back to each weight's dtype.

Tied embeddings (the embedded model, Qwen3-0.6B, ...): `lm_head` IS `embed_tokens`, so
orthogonalising the embedding rows would also change what the model READS from the stream at
the end. The paper leaves the unembedding alone, and the runtime ablation only touches writes, so
by default (`tied="untie"`) the output matrix is kept as it was: the model gets its own `lm_head`
(a copy of the original embedding) and `tie_word_embeddings` becomes false. Any HF loader runs the
result (config + `lm_head.weight`), its logits equal the runtime ablation's, and the cost is one
vocab x hidden matrix more in the checkpoint. `tied="keep"` orthogonalises the shared matrix
instead (no extra matrix; the model then also cannot read r̂ out of the final hidden state): its
runtime twin is `ablate_direction(..., unembed=True)`.
"""
from __future__ import annotations

import torch
from torch import nn

from steering.hooks import _check_vector, layer_weight_list, unit


@torch.no_grad()
def _orth_out(linear: nn.Linear, r: torch.Tensor, w: float) -> None:
    """Output side: W <- W - w r̂ r̂ᵀ W (and the bias)."""
    W = linear.weight.float()
    linear.weight.copy_((W - w * torch.outer(r, r @ W)).to(linear.weight.dtype))
    if linear.bias is not None:
        b = linear.bias.float()
        linear.bias.copy_((b - w * (b @ r) * r).to(linear.bias.dtype))


@torch.no_grad()
def _orth_rows(weight: torch.Tensor, r: torch.Tensor, w: float) -> torch.Tensor:
    """Rows: e <- e - w (e·r̂) r̂."""
    E = weight.float()
    return (E - w * torch.outer(E @ r, r)).to(weight.dtype)


@torch.no_grad()
def orthogonalize(model, direction: torch.Tensor, layer_weights=None, embed_weight: float = 1.0,
                  tied: str = "untie"):
    """Abliterate `model` in place against `direction` (normalised here); returns the model.

    tied: what to do when the embeddings are tied to the output: "untie" (default) or "keep"
    (see the module docstring). Ignored for untied models.
    """
    if tied not in ("untie", "keep"):
        raise ValueError(f"tied: expected 'untie' or 'keep', got {tied!r}")
    weights = layer_weight_list(model, layer_weights)
    emb = model.model.embed_tokens.weight
    r = unit(_check_vector(model, direction, "direction").float()).to(emb.device)
    if model.config.tie_word_embeddings and tied == "untie":
        head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False,
                         device=emb.device, dtype=emb.dtype)
        head.weight.copy_(emb)
        model.lm_head = head
        model.config.tie_word_embeddings = False
        model.config.raw["tie_word_embeddings"] = False
    model.model.embed_tokens.weight.copy_(_orth_rows(emb, r, embed_weight))
    for layer, w in zip(model.model.layers, weights):
        _orth_out(layer.self_attn.o_proj, r, w)
        _orth_out(layer.mlp.down_proj, r, w)
    return model


@torch.no_grad()
def orthogonal_residual(model, direction: torch.Tensor) -> dict[str, float]:
    """Largest |component along r̂| of each residual-writing weight (0 after full abliteration)."""
    r = unit(direction).to(model.model.embed_tokens.weight.device)
    out = {"model.embed_tokens.weight": float((model.model.embed_tokens.weight.float() @ r).abs().max())}
    for i, layer in enumerate(model.model.layers):
        for name, lin in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
            out[f"model.layers.{i}.{name}.weight"] = float((r @ lin.weight.float()).abs().max())
            if lin.bias is not None:
                out[f"model.layers.{i}.{name}.bias"] = float((r @ lin.bias.float()).abs())
    return out
