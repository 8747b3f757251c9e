"""Runtime interventions on the residual stream: steering (add a vector) and direction ablation.

Both are plain forward hooks, so they work wherever the model runs: a training forward, the
KV-cached sampler (prefill and every decode step go through the same modules, and the cached
keys/values of later layers are computed from the steered stream), under `torch.no_grad` or with
gradients. Removing the hooks restores the model exactly: nothing else is touched, so the logits
afterwards are bit-identical to the unsteered model's.

* Steering: `coefficient * vector` is added to the output of `model.model.layers[i]` (the
  residual stream after layer i). `apply_to="all"` adds it at every position, prompt and generated
  tokens alike (ActAdd / CAA style). `apply_to="prompt"` adds it only while the prompt is
  processed: a decode step of the KV-cached sampler (a layer call with a cache and cache_pos > 0)
  is left alone, so generated tokens see a steered prompt through the cache but are not pushed
  themselves (a forward without a cache counts as prompt everywhere). On the embedded model
  "prompt" keeps the answers intact where "all" soon repeats itself ("Happy to help!Happy to ..."). Several vectors compose: each `add` is its own hook, hooks on one layer run in
  order, and since each adds a constant the result is the sum (up to float rounding order).
* Direction ablation (Arditi et al. 2024): r̂ r̂ᵀ is subtracted from everything that WRITES into the
  residual stream: the embedding output and the output of every `o_proj` and `down_proj`. Then
  the stream holds no r̂ component at any layer (input, middle or output of a block), which is
  the paper's "project out r̂ at every layer and position", and it is the exact runtime twin of
  orthogonalising those weights (steering/abliterate.py). An optional weight per layer scales
  the projection (w = 1: remove the component, w = 0: leave it).
  `unembed=True` also projects the final normed hidden state: the twin of an abliterated model
  whose tied lm_head (= embed_tokens) was orthogonalised together with the embeddings.

Every function returns a `Hooks` handle: `.remove()` it, or use it as a context manager.
"""
from __future__ import annotations

import torch

from steering.capture import check_layers
from steering.vectors import SteeringVector


class Hooks:
    """A group of torch hook handles removed together; a context manager."""

    def __init__(self, handles=()):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _check_vector(model, v: torch.Tensor, what: str) -> torch.Tensor:
    h = model.config.hidden_size
    if not torch.is_tensor(v):
        raise TypeError(f"{what}: expected a tensor of shape ({h},), got {type(v).__name__}")
    if v.dim() != 1 or v.numel() != h:
        raise ValueError(f"{what} has shape {tuple(v.shape)}, but this model's hidden_size is {h} "
                         f"(a vector from a model of another width?)")
    if not torch.isfinite(v).all():
        raise ValueError(f"{what} has non-finite values")
    w = model.model.embed_tokens.weight
    return v.detach().to(device=w.device, dtype=w.dtype)


APPLY_TO = ("all", "prompt")


def _add_hook(delta: torch.Tensor, apply_to: str):
    def hook(module, args, output):
        # DecoderLayer is called as layer(x, cos, sin, mask, cache, cache_pos)
        if apply_to == "prompt" and len(args) > 5 and args[4] is not None and args[5] > 0:
            return None  # a decode step: leave the output as it is
        return output + delta
    return hook


def add_vector(model, vector, layers=None, coefficient: float | None = None, apply_to: str | None = None) -> Hooks:
    """Add `coefficient * vector` to the residual stream after each layer in `layers`.

    `vector`: a (hidden,) tensor (then `layers` is required, the same vector at each; coefficient
    defaults to 1, apply_to to "all"), or a SteeringVector (its own layers, coefficient and
    apply_to unless given here).
    """
    if isinstance(vector, SteeringVector):
        apply_to = vector.apply_to if apply_to is None else apply_to
        vector.check(model)
        layers = check_layers(model, vector.layers if layers is None else layers)
        missing = [i for i in layers if i not in vector.vectors]
        if missing:
            raise ValueError(f"steering vector has no vector for layer(s) {missing} (it has {vector.layers})")
        coefficient = vector.coefficient if coefficient is None else coefficient
        per_layer = {i: vector.vectors[i] for i in layers}
    else:
        if layers is None:
            raise ValueError("add_vector: give the layer(s) to steer at for a plain tensor vector")
        layers = check_layers(model, layers)
        per_layer = {i: vector for i in layers}
        coefficient = 1.0 if coefficient is None else coefficient
    apply_to = apply_to or "all"
    if apply_to not in APPLY_TO:
        raise ValueError(f"apply_to: expected one of {APPLY_TO}, got {apply_to!r}")
    # every vector is checked before any hook is registered: an error leaves no hook behind
    deltas = {i: float(coefficient) * _check_vector(model, v, f"steering vector for layer {i}")
              for i, v in per_layer.items()}
    return Hooks(model.model.layers[i].register_forward_hook(_add_hook(d, apply_to)) for i, d in deltas.items())


class Steerer:
    """Several steering vectors on one model: `add` returns a handle, `remove`/`clear` undo.

        with Steerer(model) as s:
            s.add(style, coefficient=4.0)
            s.add(other_vec, layers=[1], coefficient=-2.0)
            texts = generate_texts(model, tok, prompts)
        # every hook is gone here
    """

    def __init__(self, model):
        self.model = model
        self.active: list[Hooks] = []

    def add(self, vector, layers=None, coefficient: float | None = None, apply_to: str | None = None) -> Hooks:
        h = add_vector(self.model, vector, layers, coefficient, apply_to)
        self.active.append(h)
        return h

    def remove(self, handle: Hooks) -> None:
        handle.remove()
        self.active = [h for h in self.active if h is not handle]

    def clear(self) -> None:
        for h in self.active:
            h.remove()
        self.active.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.clear()
        return False


def unit(direction: torch.Tensor) -> torch.Tensor:
    d = direction.detach().float().reshape(-1)
    n = d.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("direction has zero (or non-finite) norm; cannot normalise it")
    return d / n


def layer_weight_list(model, layer_weights) -> list[float]:
    """Per-layer ablation weights: None (all 1), a list with one per layer, or {layer: weight} (others 1)."""
    n = len(model.model.layers)
    if layer_weights is None:
        return [1.0] * n
    if isinstance(layer_weights, dict):
        check_layers(model, [int(i) for i in layer_weights])
        return [float(layer_weights.get(i, layer_weights.get(str(i), 1.0))) for i in range(n)]
    layer_weights = [float(w) for w in layer_weights]
    if len(layer_weights) != n:
        raise ValueError(f"layer_weights: expected one weight per layer ({n}), got {len(layer_weights)}")
    return layer_weights


def _project_hook(r: torch.Tensor, weight: float):
    def hook(module, args, output):
        return output - weight * (output @ r)[..., None] * r
    return hook


def ablate_direction(model, direction: torch.Tensor, layer_weights=None, embed_weight: float = 1.0,
                     unembed: bool = False) -> Hooks:
    """Project r̂ = direction/‖direction‖ out of every write into the residual stream (run time).

    The twin of `steering.abliterate.orthogonalize` with the same arguments: the logits agree with
    the abliterated model's up to float rounding. `unembed=True` matches `tied="keep"` there.
    """
    r = _check_vector(model, unit(_check_vector(model, direction, "direction").float()), "direction")
    weights = layer_weight_list(model, layer_weights)
    handles = [model.model.embed_tokens.register_forward_hook(_project_hook(r, embed_weight))]
    for layer, w in zip(model.model.layers, weights):
        handles.append(layer.self_attn.o_proj.register_forward_hook(_project_hook(r, w)))
        handles.append(layer.mlp.down_proj.register_forward_hook(_project_hook(r, w)))
    if unembed:
        handles.append(model.model.norm.register_forward_hook(_project_hook(r, embed_weight)))
    return Hooks(handles)
