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
from dataclasses import dataclass
from typing import Literal

import torch

from evaluation.metrics import check_gates, gate_line
from model.load import save_model
from steering.abliterate import orthogonal_residual, orthogonalize
from steering.capture import capture, check_layers, check_positions, load_prompts
from steering.directions import (Candidate, compute_directions, first_token_ids, first_token_kl,
                                 first_token_logprobs, format_table, measure, select)
from steering.hooks import ablate_direction, add_vector, unit
from steering.vectors import SteeringVector
from tasks import get_task
from trainer import distributed
from trainer.config import Method, opt, register_options
from trainer.paths import repo_path


@dataclass
class DirectionMethod(Method):
    """What steering and abliteration share: two prompt sets, candidate layers, the selection."""
    target: str = opt("harmful", "the task whose judge and markers define the behaviour (tasks/: harmful, style)")
    positive: str = opt("???", "JSONL {prompt} file of prompts that show the behaviour")
    negative: str = opt("???", "JSONL {prompt} file of matched prompts that do not")
    max_prompts: int | None = opt(None, "cap on each prompt set (evenly spaced lines; null: all)", min=1)
    layers: list[int] | None = opt(None, "candidate layers (null: every layer)")
    positions: list[int] | str = opt([-1], "negative offsets from the prompt end ([-1] = last token), or instruction")
    direction: Literal["mean", "pca"] = opt("mean", "difference of means, or PCA of paired differences")
    skip_last_layers: int = opt(0, "never choose a direction from the last N layers", min=0)
    max_kl: float | None = opt(None, "candidates need first-token KL on harmless prompts <= max_kl", min=0)
    select_prompts: int = opt(32, "training prompts per set used to measure each candidate", min=1)
    select_max_new_tokens: int = opt(12, "tokens generated per candidate measurement", min=1)
    eval_harmless: str | None = opt(None, "held-out harmless prompts for the first-token `kl`")


@register_options("abliterate")
@dataclass
class AbliterateMethod(DirectionMethod):
    """Abliteration: remove a behaviour by orthogonalising the weights against its direction."""
    program: str = opt("steering.run:abliterate", "module:function that runs the method")
    skip_last_layers: int = opt(1, "never choose a direction from the last N layers", min=0)
    max_kl: float | None = opt(0.1, "candidates need first-token KL on harmless prompts <= max_kl", min=0)
    layer_weights: list[float] | dict[str, float] | None = opt(None, "per-layer ablation weights (null: 1 everywhere)")
    embed_weight: float = opt(1.0, "weight of the embed_tokens orthogonalisation", min=0)
    tied: Literal["untie", "keep"] = opt("untie", "tied embeddings: untie (keep the original lm_head) or orthogonalise it too")


@register_options("steer")
@dataclass
class SteerMethod(DirectionMethod):
    """Activation steering: a vector added to the residual stream at run time."""
    program: str = opt("steering.run:steer", "module:function that runs the method")
    target: str = opt("style", "the task whose judge and markers define the behaviour (tasks/: harmful, style)")
    coefficient: float | list[float] = opt(1.0, "one number, or a list to choose from (candidates: layer x coefficient)")
    apply_to: Literal["prompt", "all"] = opt("prompt", "prompt positions only, or every position including decode steps")


def _target(name: str):
    """(judge, markers) of the behaviour: the named task's (tasks/)."""
    task = get_task(name)
    if not hasattr(task, "judge"):
        raise ValueError(f"method.target {name!r}: the task has no judge of a single reply (try harmful or style)")
    return task.judge, task.markers


def _spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (prompt files are grouped by topic; take every topic)."""
    if not n or n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] if n > 1 else items[0] for i in range(n)]


def _directions(m, model, tok):
    """(layers, directions (len(layers), H), positions, pos prompts, neg prompts) from the method config."""
    # max_prompts takes evenly spaced lines (files are grouped by topic); paired files stay paired
    pos = _spread(load_prompts(repo_path(m.positive)), m.max_prompts)
    neg = _spread(load_prompts(repo_path(m.negative)), m.max_prompts)
    layers = check_layers(model, m.layers)
    positions = check_positions(m.positions)
    a = capture(model, tok, pos, layers, positions)
    b = capture(model, tok, neg, layers, positions)
    return layers, compute_directions(a, b, m.direction), positions, pos, neg


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
    if cfg.method.gates and "after" in results:
        results["gates"] = check_gates(results["after"], cfg.method.gates)
        for name, g in results["gates"].items():
            distributed.log(f"[{cfg.method.kind}] {gate_line(name, g)}")
    return results


def run_abliterate(cfg, model, tok, run_dir: str, evaluator) -> dict:
    """Find the refusal direction, orthogonalise the weights against it, evaluate, save the checkpoint."""
    m = cfg.method
    os.makedirs(run_dir, exist_ok=True)
    judge, markers = _target(m.target)
    layers, dirs, positions, harmful, harmless = _directions(m, model, tok)
    weights = m.layer_weights
    embed_weight = m.embed_weight
    tied = m.tied
    unembed = tied == "keep" and model.config.tie_word_embeddings
    targets = _spread(harmful, m.select_prompts)
    kl_prompts = _spread(harmless, m.select_prompts)
    ref_kl = first_token_logprobs(model, tok, kl_prompts)
    marker_ids = first_token_ids(tok, markers)
    cands = []
    for layer, d in zip(layers, dirs):
        c = Candidate(layer, round(float(d.norm()), 4), skipped=_skipped(layer, model, m.skip_last_layers))
        res = measure(model, tok, lambda d=d: ablate_direction(model, d, weights, embed_weight, unembed), targets,
                      judge, marker_ids, kl_prompts, ref_kl, m.select_max_new_tokens)
        c.rate, c.score, c.kl = res["rate"], res["score"], res["kl"]
        cands.append(c)
    best, note = select(cands, "remove", m.max_kl)
    table = format_table(cands, f"[abliterate] candidates (direction ablated at every layer; rate = refusal rate, "
                                f"score = refusal log-odds on {len(targets)} training prompts, kl on harmless)")
    distributed.log(table + (f"\n[abliterate] {note}" if note else ""))
    distributed.log(f"[abliterate] chosen layer {best.layer}")

    eval_harmless = load_prompts(repo_path(m.eval_harmless)) if m.eval_harmless else []
    ref_eval = first_token_logprobs(model, tok, eval_harmless) if eval_harmless else None
    results = {}
    if cfg.eval_before:
        results["before"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        distributed.log(f"[abliterate] before: {results['before']}")
    direction = unit(dirs[layers.index(best.layer)])
    orthogonalize(model, direction, weights, embed_weight, tied)
    residual = max(orthogonal_residual(model, direction).values())
    if cfg.eval_after:
        results["after"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        distributed.log(f"[abliterate] after: {results['after']}")
    info = {"positions": positions, "direction": m.direction, "positive": m.positive,
            "negative": m.negative, "layer_weights": weights, "embed_weight": embed_weight, "tied": tied,
            "norm": best.norm}
    SteeringVector.for_model(model, {best.layer: direction}, coefficient=0.0, kind="direction", info=info) \
        .save(os.path.join(run_dir, "refusal_direction.safetensors"))
    final = save_model(model, os.path.join(run_dir, "checkpoints", "final"), tok)
    results["selected"] = {"layer": best.layer, "norm": best.norm, "positions": positions,
                           "max_weight_component": residual, "note": note, "checkpoint": final}
    distributed.log(f"[abliterate] saved {final} (largest weight component along the direction: {residual:.2e})")
    return _finish(cfg, results, run_dir, cands)


def run_steer(cfg, model, tok, run_dir: str, evaluator) -> dict:
    """Find a steering vector (per layer x coefficient), evaluate with it applied, save it."""
    m = cfg.method
    os.makedirs(run_dir, exist_ok=True)
    judge, markers = _target(m.target)
    layers, dirs, positions, pos, neg = _directions(m, model, tok)
    coefficients = m.coefficient
    coefficients = [float(c) for c in (coefficients if isinstance(coefficients, list) else [coefficients])]
    if not coefficients:
        raise ValueError("method.coefficient: expected a number or a non-empty list of numbers")
    apply_to = m.apply_to
    targets = _spread(neg, m.select_prompts)
    ref_kl = first_token_logprobs(model, tok, targets)
    marker_ids = first_token_ids(tok, markers)
    cands = []
    for layer, d in zip(layers, dirs):
        for coef in coefficients:
            c = Candidate(layer, round(float(d.norm()), 4), coef,
                          skipped=_skipped(layer, model, m.skip_last_layers))
            res = measure(model, tok, lambda d=d, L=layer, k=coef: add_vector(model, d, [L], k, apply_to), targets,
                          judge, marker_ids, targets, ref_kl, m.select_max_new_tokens)
            c.rate, c.score, c.kl = res["rate"], res["score"], res["kl"]
            cands.append(c)
    best, note = select(cands, "induce", m.max_kl)
    table = format_table(cands, f"[steer] candidates (vector added after the layer; rate = {m.target} "
                                f"rate, score = log-odds on {len(targets)} training prompts without the cue)")
    distributed.log(table + (f"\n[steer] {note}" if note else ""))
    distributed.log(f"[steer] chosen layer {best.layer}, coefficient {best.coefficient}")
    vector = SteeringVector.for_model(
        model, {best.layer: dirs[layers.index(best.layer)]}, coefficient=best.coefficient, kind="steer",
        apply_to=apply_to, info={"positions": positions, "direction": m.direction,
                                 "positive": m.positive, "negative": m.negative, "target": m.target})

    eval_harmless = load_prompts(repo_path(m.eval_harmless)) if m.eval_harmless else []
    ref_eval = first_token_logprobs(model, tok, eval_harmless) if eval_harmless else None
    results = {}
    if cfg.eval_before:
        results["before"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        distributed.log(f"[steer] before: {results['before']}")
    if cfg.eval_after:
        with add_vector(model, vector):
            results["after"] = _evaluate(evaluator, model, tok, eval_harmless, ref_eval)
        distributed.log(f"[steer] after (steered): {results['after']}")
    path = vector.save(os.path.join(run_dir, "checkpoints", "final", "steering_vector.safetensors"))
    results["selected"] = {"layer": best.layer, "coefficient": best.coefficient, "norm": best.norm,
                           "positions": positions, "apply_to": apply_to, "note": note, "vector": path}
    distributed.log(f"[steer] saved {path}")
    return _finish(cfg, results, run_dir, cands)


def _program(cfg, run_dir: str, fn) -> dict:
    """Load the model (no adapters: these programs edit or hook the base), evaluate, run, write eval.json."""
    from evaluation.metrics import Evaluator, held_out_sets
    from trainer.run import setup, write_json

    if cfg.lora.kind != "none":
        raise ValueError(f"method={cfg.method.name} works on the base model's weights and activations; "
                         f"lora={cfg.lora.kind} does not apply (use lora=none)")
    if distributed.world_size() > 1:
        raise NotImplementedError("steering and abliteration run in one process (no torchrun)")
    model, tok, device, _ = setup(cfg, run_dir)
    distributed.log(f"[posttrain] {cfg.method.name} on {device}; run dir {run_dir}")
    evaluator = Evaluator(tok, held_out_sets(cfg), cfg.eval_max_examples)
    results = fn(cfg, model, tok, run_dir, evaluator)
    write_json(os.path.join(run_dir, "eval.json"), results)
    return results


def abliterate(cfg, run_dir: str) -> dict:
    """`python train.py method=abliterate`."""
    return _program(cfg, run_dir, run_abliterate)


def steer(cfg, run_dir: str) -> dict:
    """`python train.py method=steer`."""
    return _program(cfg, run_dir, run_steer)
