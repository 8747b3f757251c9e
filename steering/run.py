"""`python train.py method=abliterate` and `method=steer`: the two entry points train.py calls.

Both follow the same steps, each a function of its own file:
  1. read the two prompt sets (method.positive / method.negative, JSONL with "prompt"),
  2. capture residual activations at method.positions after every candidate layer (capture.py),
  3. one direction per layer by difference of means or PCA (directions.py),
  4. measure every candidate with the intervention in place, on training prompts, pick one and
     print the table (directions.py); the table also goes to DIR/candidates.json,
  5. eval.json "before" / "after" with the Evaluator train.py built over the held-out sets, plus
     `kl`: the first-token KL(after || before) on method.eval_harmless (0 before). The
     Evaluator's own per-token KL on the sft references is kept as `sft_kl`,
  6. save: abliterate -> the orthogonalised model as a HF directory in DIR/checkpoints/final
     (runs in any HF loader without hooks) and the unit direction in DIR/refusal_direction.safetensors;
     steer -> DIR/checkpoints/final/steering_vector.safetensors (the model itself is unchanged).
Each returns {"before", "after", "selected", "candidates", "gates"?} for eval.json.
"""
from __future__ import annotations

import json
import os

import torch
from omegaconf import OmegaConf

from data.synthetic import REFUSAL_MARKERS, STYLE_PREFIX
from evaluation.metrics import check_gates, gate_line
from model.load import save_model
from rollout.verifiers import is_refusal, is_styled
from steering.abliterate import orthogonal_residual, orthogonalize
from steering.capture import capture, check_layers, check_positions, load_prompts
from steering.directions import (Candidate, compute_directions, first_token_ids, first_token_kl,
                                 first_token_logprobs, format_table, measure, select)
from steering.hooks import ablate_direction, add_vector, unit
from steering.vectors import SteeringVector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"refusal": (is_refusal, REFUSAL_MARKERS), "style": (is_styled, (STYLE_PREFIX,))}


def _path(path: str | None) -> str | None:
    """As given if it exists, else relative to the repository root (as train.py resolves data paths)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO, path)


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (prompt files are grouped by topic; take every topic)."""
    if not n or n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] if n > 1 else items[0] for i in range(n)]


def _target(name: str):
    if name not in TARGETS:
        raise ValueError(f"method.target {name!r}: expected one of {sorted(TARGETS)}")
    return TARGETS[name]


def _directions(m, model, tok):
    """(layers, directions (len(layers), H), positions, pos prompts, neg prompts) from the method config."""
    if not m.get("positive") or not m.get("negative"):
        raise ValueError("method.positive and method.negative must both name a JSONL prompt file")
    # max_prompts takes evenly spaced lines (files are grouped by topic); paired files stay paired
    pos = _spread(load_prompts(_path(m.positive)), m.get("max_prompts"))
    neg = _spread(load_prompts(_path(m.negative)), m.get("max_prompts"))
    layers = check_layers(model, _plain(m.get("layers")))
    positions = check_positions(_plain(m.get("positions", [-1])))
    a = capture(model, tok, pos, layers, positions)
    b = capture(model, tok, neg, layers, positions)
    return layers, compute_directions(a, b, m.get("direction", "mean")), positions, pos, neg


def _skipped(layer: int, model, skip_last: int) -> str:
    n = len(model.model.layers)
    return f"last {skip_last} layer(s)" if layer >= n - skip_last else ""


def _evaluate(evaluator, model, tok, harmless: list[str], ref_logp: torch.Tensor) -> dict:
    metrics = evaluator(model)
    if "kl" in metrics:
        metrics["sft_kl"] = metrics.pop("kl")
    if harmless:
        metrics["kl"] = round(first_token_kl(first_token_logprobs(model, tok, harmless), ref_logp), 5)
    return metrics


def _finish(cfg, results: dict, run_dir: str, cands: list[Candidate]) -> dict:
    results["candidates"] = [c.row() for c in cands]
    with open(os.path.join(run_dir, "candidates.json"), "w", encoding="utf-8") as f:
        json.dump(results["candidates"], f, indent=2)
    gates = _plain(cfg.method.get("gates"))
    if gates and "after" in results:
        results["gates"] = check_gates(results["after"], gates)
        for name, g in results["gates"].items():
            print(f"[{cfg.method.get('kind', 'steering')}] {gate_line(name, g)}")
    return results


def run_abliterate(cfg, model, tok, run_dir: str, evaluator) -> dict:
    """Find the refusal direction, orthogonalise the weights against it, evaluate, save the checkpoint."""
    m = cfg.method
    os.makedirs(run_dir, exist_ok=True)
    judge, markers = _target(m.get("target", "refusal"))
    layers, dirs, positions, harmful, harmless = _directions(m, model, tok)
    weights = _plain(m.get("layer_weights"))
    embed_weight = float(m.get("embed_weight", 1.0))
    tied = m.get("tied", "untie")
    unembed = tied == "keep" and model.config.tie_word_embeddings
    targets = _spread(harmful, m.get("select_prompts", 32))
    kl_prompts = _spread(harmless, m.get("select_prompts", 32))
    ref_kl = first_token_logprobs(model, tok, kl_prompts)
    marker_ids = first_token_ids(tok, markers)
    cands = []
    for layer, d in zip(layers, dirs):
        c = Candidate(layer, round(float(d.norm()), 4), skipped=_skipped(layer, model, m.get("skip_last_layers", 1)))
        res = measure(model, tok, lambda d=d: ablate_direction(model, d, weights, embed_weight, unembed), targets,
                      judge, marker_ids, kl_prompts, ref_kl, m.get("select_max_new_tokens", 12))
        c.rate, c.score, c.kl = res["rate"], res["score"], res["kl"]
        cands.append(c)
    best, note = select(cands, "remove", m.get("max_kl", 0.1))
    table = format_table(cands, f"[abliterate] candidates (direction ablated at every layer; rate = refusal rate, "
                                f"score = refusal log-odds on {len(targets)} training prompts, kl on harmless)")
    print(table + (f"\n[abliterate] {note}" if note else ""))
    print(f"[abliterate] chosen layer {best.layer}")

    eval_harmless = load_prompts(_path(m.eval_harmless)) if m.get("eval_harmless") else []
    ref_eval = first_token_logprobs(model, tok, eval_harmless) if eval_harmless else None
    results = {}
    if cfg.get("eval_before", True):
        results["before"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        print(f"[abliterate] before: {results['before']}")
    direction = unit(dirs[layers.index(best.layer)])
    orthogonalize(model, direction, weights, embed_weight, tied)
    residual = max(orthogonal_residual(model, direction).values())
    if cfg.get("eval_after", True):
        results["after"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        print(f"[abliterate] after: {results['after']}")
    info = {"positions": positions, "direction": m.get("direction", "mean"), "positive": m.positive,
            "negative": m.negative, "layer_weights": weights, "embed_weight": embed_weight, "tied": tied,
            "norm": best.norm}
    SteeringVector.for_model(model, {best.layer: direction}, coefficient=0.0, kind="direction", info=info) \
        .save(os.path.join(run_dir, "refusal_direction.safetensors"))
    final = save_model(model, os.path.join(run_dir, "checkpoints", "final"), tok)
    results["selected"] = {"layer": best.layer, "norm": best.norm, "positions": positions,
                           "max_weight_component": residual, "note": note, "checkpoint": final}
    print(f"[abliterate] saved {final} (largest weight component along the direction: {residual:.2e})")
    return _finish(cfg, results, run_dir, cands)


def run_steer(cfg, model, tok, run_dir: str, evaluator) -> dict:
    """Find a steering vector (per layer x coefficient), evaluate with it applied, save it."""
    m = cfg.method
    os.makedirs(run_dir, exist_ok=True)
    judge, markers = _target(m.get("target", "style"))
    layers, dirs, positions, pos, neg = _directions(m, model, tok)
    coefficients = _plain(m.get("coefficient", 1.0))
    coefficients = [float(c) for c in (coefficients if isinstance(coefficients, list) else [coefficients])]
    if not coefficients:
        raise ValueError("method.coefficient: expected a number or a non-empty list of numbers")
    apply_to = m.get("apply_to", "prompt")
    targets = _spread(neg, m.get("select_prompts", 32))
    ref_kl = first_token_logprobs(model, tok, targets)
    marker_ids = first_token_ids(tok, markers)
    cands = []
    for layer, d in zip(layers, dirs):
        for coef in coefficients:
            c = Candidate(layer, round(float(d.norm()), 4), coef,
                          skipped=_skipped(layer, model, m.get("skip_last_layers", 0)))
            res = measure(model, tok, lambda d=d, L=layer, k=coef: add_vector(model, d, [L], k, apply_to), targets,
                          judge, marker_ids, targets, ref_kl, m.get("select_max_new_tokens", 12))
            c.rate, c.score, c.kl = res["rate"], res["score"], res["kl"]
            cands.append(c)
    best, note = select(cands, "induce", m.get("max_kl"))
    table = format_table(cands, f"[steer] candidates (vector added after the layer; rate = {m.get('target', 'style')} "
                                f"rate, score = log-odds on {len(targets)} training prompts without the cue)")
    print(table + (f"\n[steer] {note}" if note else ""))
    print(f"[steer] chosen layer {best.layer}, coefficient {best.coefficient}")
    vector = SteeringVector.for_model(
        model, {best.layer: dirs[layers.index(best.layer)]}, coefficient=best.coefficient, kind="steer",
        apply_to=apply_to, info={"positions": positions, "direction": m.get("direction", "mean"),
                                 "positive": m.positive, "negative": m.negative, "target": m.get("target", "style")})

    eval_harmless = load_prompts(_path(m.eval_harmless)) if m.get("eval_harmless") else []
    ref_eval = first_token_logprobs(model, tok, eval_harmless) if eval_harmless else None
    results = {}
    if cfg.get("eval_before", True):
        results["before"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        print(f"[steer] before: {results['before']}")
    if cfg.get("eval_after", True):
        with add_vector(model, vector):
            results["after"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        print(f"[steer] after (steered): {results['after']}")
    path = vector.save(os.path.join(run_dir, "checkpoints", "final", "steering_vector.safetensors"))
    results["selected"] = {"layer": best.layer, "coefficient": best.coefficient, "norm": best.norm,
                           "positions": positions, "apply_to": apply_to, "note": note, "vector": path}
    print(f"[steer] saved {path}")
    return _finish(cfg, results, run_dir, cands)
