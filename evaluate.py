"""Evaluate runs and models side by side and write a report (the held-out metrics: evaluation/metrics.py).

    python evaluate.py run=runs/dpo/DIR                      # a run directory (or a model dir / hub id)
    python evaluate.py run=A compare=[B,C] out=report/       # several, side by side
    python evaluate.py run=Qwen/Qwen3-0.6B data=held_out.jsonl base=none max_examples=100

-> training_curves.png (metrics.jsonl), perplexity_distribution.png, response_lengths.png,
   model_comparison.png, evaluation_stats.json (every number behind the plots, which are drawn from it
   by evaluation/plots.py) and sample_responses.json (each model's answer to the same prompts), written
   into the run directory (a comparison: DIR/comparison/) unless out= is given. KL and the implicit
   preference reward are measured against `base` (default: the model the first run started from, read
   from its .hydra/config.yaml; base=none for absolute numbers). Bad input is one line on stderr, exit 1.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch

from dataclasses import dataclass, fields

from data.formats import DataError, read_jsonl
from evaluation.metrics import Evaluator, pair_accuracy
from tasks import TASKS, GenerationTask
from trainer.config import defaults, opt
from trainer.paths import repo_path as _repo_path


# ============================================================================= command line
# python evaluate.py run=DIR [compare=[DIR,DIR]] [data=FILE|[NAME:FILE,...]] [out=DIR] [base=DIR|none]
#                    [max_examples=N] [max_new_tokens=N] [samples=N] [curves=true|false] [device=auto|cpu|cuda]
# The options, their types and defaults: EvalOptions below (configs/evaluate.yaml), parsed with Hydra's
# override grammar like train.py's.
#
# Everything is computed first (stats), written to evaluation_stats.json, and the four figures are
# then drawn from that dictionary alone (evaluation/plots.py), so the JSON holds every number a
# figure shows. Models are evaluated one at a time and freed, so comparing runs of a large model
# needs the memory of one model (plus the base's KL rows).

USAGE = ("usage: python evaluate.py run=DIR [compare=[DIR,...]] [data=FILE|[NAME:FILE,...]] [out=DIR] "
         "[base=DIR|none] [max_examples=N] [max_new_tokens=N] [samples=N] [curves=true|false] [device=auto|cpu|cuda]")
OUTPUT_FILES = ("training_curves.png", "perplexity_distribution.png", "response_lengths.png", "model_comparison.png",
                "evaluation_stats.json", "sample_responses.json")


class EvalError(Exception):
    """Bad input to evaluate.py: printed as one line, no traceback."""


@dataclass
class EvalOptions:
    """python evaluate.py KEY=VALUE ..."""
    run: str | None = opt(None, "a run directory, a model directory or a hub id")
    compare: list[str] = opt([], "more runs or models, side by side")
    data: str | list[str] | None = opt(None, "held-out FILE(s), NAME:FILE to name the task (default: the run's data.eval)")
    out: str | None = opt(None, "where the six files go (default: the run directory, or RUN/comparison)")
    base: str | None = opt("auto", "reference for kl and implicit rewards: auto (the run's model.path), DIR, or none")
    max_examples: int = opt(200, "examples per held-out set", min=1)
    max_new_tokens: int = opt(32, "greedy tokens per reply", min=1)
    samples: int = opt(5, "prompts per set in sample_responses.json", min=0)
    curves: bool = opt(True, "plot the run's metrics.jsonl")
    device: str = opt("auto", "auto | cpu | cuda")
    kl_examples: int = opt(32, "reference answers the exact KL is measured on", min=1)


def _compose(argv: list[str]):
    """EvalOptions' defaults (stored in Hydra as the primary config `evaluate`, with no config
    directory: train.py's groups such as `data` would capture `data=FILE`) with `argv` applied."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    ConfigStore.instance().store(name="evaluate", node=defaults(EvalOptions))
    GlobalHydra.instance().clear()
    with initialize(config_path=None, version_base="1.3"):
        return compose("evaluate", overrides=list(argv))


def parse_args(argv: list[str]) -> dict:
    """`key=value` arguments (Hydra's override grammar; lists as [a,b]) -> a dict of typed options."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import ConfigError, build

    keys = [f.name for f in fields(EvalOptions)]
    for arg in argv:
        key, eq, _ = arg.partition("=")
        if not eq or key.lstrip("+") not in keys:
            raise EvalError(f"unknown argument {arg!r}; expected key=value with key one of {', '.join(keys)}. {USAGE}")
    try:
        o = build(EvalOptions, OmegaConf.to_container(_compose(argv)), "")
    except ConfigError as e:
        raise EvalError(str(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise EvalError(f"cannot parse the arguments: {' '.join(str(e).split())}. {USAGE}") from None
    targets = ([o.run] if o.run else []) + o.compare
    if not targets:
        raise EvalError(f"nothing to evaluate: give run=DIR (a run directory, model directory or hub id). {USAGE}")
    data = [o.data] if isinstance(o.data, str) else o.data
    return {**{f.name: getattr(o, f.name) for f in fields(EvalOptions)}, "data": data, "targets": targets}


class Target:
    """One thing to evaluate: a run directory (curves + checkpoints/final) or a model directory / hub id."""

    def __init__(self, path: str, want_curves: bool = True):
        self.path = path
        self.is_run = False
        self.run_dir = self.model_dir = self.metrics_path = None
        self.hydra = {}
        if os.path.isdir(path):
            has_model = any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))
            run_markers = ("metrics.jsonl", "eval.json", "checkpoints", ".hydra", "train.log")
            if not has_model and any(os.path.exists(os.path.join(path, m)) for m in run_markers):
                self.is_run, self.run_dir = True, path
            elif not has_model:
                raise EvalError(f"{path}: cannot load a model: looked for {os.path.join(path, 'checkpoints', 'final')} "
                                f"(a run directory) and for config.json or adapter_config.json in {path} "
                                f"(a model or PEFT adapter directory); found none")
            else:
                self.model_dir = path
        elif os.path.exists(path):
            raise EvalError(f"{path}: expected a run directory, a model directory or a hub id, got a file")
        else:
            self.model_dir = path  # a hub id (load_model resolves it, or says what it looked for)
        if self.is_run:
            self.metrics_path = os.path.join(path, "metrics.jsonl")
            if want_curves and not os.path.isfile(self.metrics_path):
                raise EvalError(f"{path}: no metrics.jsonl: the training curves of a run directory are read from "
                                f"{self.metrics_path} (pass curves=false, or run=DIR/checkpoints/final to evaluate "
                                f"the model alone)")
            final = os.path.join(path, "checkpoints", "final")
            if not any(os.path.isfile(os.path.join(final, f)) for f in ("config.json", "adapter_config.json")):
                raise EvalError(f"{path}: cannot load a model: looked for {final}/config.json (a Hugging Face "
                                f"model directory) or {final}/adapter_config.json (a PEFT adapter); found neither "
                                f"(did the run finish?)")
            self.model_dir = final
            hydra_cfg = os.path.join(path, ".hydra", "config.yaml")
            if os.path.isfile(hydra_cfg):
                from omegaconf import OmegaConf

                self.hydra = OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=False)
        parts = os.path.normpath(path).split(os.sep)
        if len(parts) >= 3 and parts[-2:] == ["checkpoints", "final"]:  # RUN/checkpoints/final -> RUN
            parts = parts[:-2]
        self.label = parts[-1] or path

    @property
    def method(self) -> str | None:
        return (self.hydra.get("method") or {}).get("name")


def load_for_eval(path: str, device=None, dtype="auto"):
    """(model, tokenizer, info) from a HF model directory, a PEFT adapter directory or a hub id.

    An adapter directory (adapter_config.json) loads its base from `base_model_name_or_path` (relative
    paths resolve against the repository too) and the adapters on top. Any failure is an EvalError that
    says what was looked for.
    """
    from model.load import load_model

    adapter_cfg = os.path.join(path, "adapter_config.json")
    try:
        if os.path.isfile(adapter_cfg):
            from lora.peft_io import load_adapter
            from model.tokenizer import Tokenizer

            with open(adapter_cfg, encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
            if not base:
                raise EvalError(f"{adapter_cfg}: no base_model_name_or_path: cannot tell which base model the "
                                f"adapter belongs to")
            model, tok = load_model(_repo_path(base), dtype=dtype, device=device)
            load_adapter(model, path)
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                tok = Tokenizer.from_dir(path)
            return model.eval(), tok, {"adapter": True, "base_model": base}
        model, tok = load_model(path, dtype=dtype, device=device)
        return model, tok, {"adapter": False}
    except EvalError:
        raise
    except (FileNotFoundError, ValueError, RuntimeError, OSError, KeyError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot load the model: {e}") from None


def read_metrics(path: str) -> list[dict]:
    """The lines of a metrics.jsonl; a resumed run's repeated steps keep their last line; sorted by step."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise EvalError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
            by_step[row["step"]] = row
    if not by_step:
        raise EvalError(f"{path}: empty: no training steps were logged")
    return [by_step[s] for s in sorted(by_step)]


def main_curve_keys(keys) -> list[str]:
    """loss, then the method's main metrics: margins/accuracies (preference), reward/kl/entropy (RL), then grad_norm."""
    keys = set(keys)
    order = ["loss"]
    if "rewards/margins" in keys:
        order += ["rewards/margins", "rewards/accuracies", "nll", "kl"]
    if "reward" in keys:
        order += ["reward", "kl", "entropy", "completion_length/mean", "frac_reward_zero_std"]
    order += ["grad_norm"]
    return [k for i, k in enumerate(order) if k in keys and k not in order[:i]]


def curves(target: Target) -> dict:
    """Every numeric key of metrics.jsonl as a series over steps, and which of them are plotted."""
    rows = read_metrics(target.metrics_path)
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k != "step" and k not in keys
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    series = {k: [(float(r[k]) if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) else None)
                  for r in rows] for k in keys}
    method = target.method or ("rl" if "reward" in keys else "preference" if "rewards/margins" in keys else None)
    return {"method": method, "path": target.metrics_path, "steps": [r["step"] for r in rows], "series": series,
            "plotted": main_curve_keys(keys),
            "final": {k: next((v for v in reversed(s) if v is not None), None) for k, s in series.items()}}


def sniff_set(path: str) -> str:
    """Which held-out set a JSONL file is, from the fields of its first record."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    read_jsonl(path, "prompt")  # raises the DataError that names the line
                    raise
                break
        else:
            raise EvalError(f"{path}: empty file: no held-out examples")
    if not isinstance(obj, dict):
        read_jsonl(path, "prompt")
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "messages" in obj or "instruction" in obj:
        return "sft"
    if "prompt" in obj and "answer" in obj:
        return "arithmetic"
    if "problem" in obj and "answer" in obj:
        return "multistep"
    if "prompt" in obj:
        raise EvalError(f"{path}: prompts without answers: name the set, harmful:{path} (refusal_rate) or "
                        f"style:{path} (style_rate)")
    raise EvalError(f"{path}: cannot tell the held-out set from fields {sorted(obj)}; expected prompt+answer "
                    f"(arithmetic), problem+answer (multistep), instruction+output or messages (sft), "
                    f"prompt+chosen+rejected (preference), or NAME:FILE with NAME one of {sorted(TASKS)}")


def held_out_files(spec: list[str] | None, targets: list[Target]) -> dict:
    """{set name: path}: data= as given, else the first run's data.eval, else configs/data/synthetic.yaml."""
    if spec:
        files = {}
        for item in spec:
            name, sep, path = item.partition(":")
            if not sep or name not in TASKS:
                name, path = None, item
            path = _repo_path(path)
            if not os.path.isfile(path):
                raise EvalError(f"{path}: data file not found")
            files[name or sniff_set(path)] = path
        return files
    run_eval = next((t.hydra.get("data", {}).get("eval") for t in targets if t.hydra.get("data", {}).get("eval")), None)
    if run_eval is None:
        from omegaconf import OmegaConf

        run_eval = OmegaConf.to_container(OmegaConf.load(_repo_path("configs/data/synthetic.yaml")))["eval"]
    files = {k: v for k, v in run_eval.items() if v and (k in TASKS or isinstance(v, dict))}
    for spec in files.values():
        path = _repo_path(spec if isinstance(spec, str) else spec["path"])
        if not os.path.isfile(path):
            raise EvalError(f"{path}: held-out file not found (give data=FILE)")
    return files


def _summary(values: list[float]) -> dict:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.quantile(a, 0.9)),
            "min": float(a.min()), "max": float(a.max())}


def histograms(per_model: dict, edges=None, bins: int = 30) -> dict:
    """{label: values} -> {label: {values, edges, counts, n, mean, median, p90, min, max}} on shared bin edges."""
    import numpy as np

    nonempty = {k: v for k, v in per_model.items() if v}
    if not nonempty:
        return {}
    if edges is None:
        all_values = np.concatenate([np.asarray(v, dtype=float) for v in nonempty.values()])
        edges = np.histogram_bin_edges(all_values, bins=min(bins, max(5, int(len(all_values) ** 0.5))))
    edges = np.asarray(edges, dtype=float)
    out = {}
    for label, values in nonempty.items():
        counts, _ = np.histogram(np.asarray(values, dtype=float), edges)
        out[label] = {"values": [float(v) for v in values], "edges": edges.tolist(), "counts": counts.tolist(),
                      **_summary(values)}
    return out


def _same_tokenizer(a, b) -> bool:
    probe = "What is 12 + 7? Answer: 19. Happy to help!"
    return a.vocab_size == b.vocab_size and a.encode(probe) == b.encode(probe)


def _unique_labels(labels: list[str]) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        new, n = label, 2
        while new in out or new == "base":
            new, n = f"{label}-{n}", n + 1
        out.append(new)
    return out


def run_evaluation(targets: list[str], data=None, out=None, base="auto", max_examples: int = 200,
                   max_new_tokens: int = 32, samples: int = 5, curves_wanted: bool = True, device="auto",
                   kl_examples: int = 32, log=print) -> dict:
    """Evaluate every target and write the six files into `out`; returns the stats dictionary."""
    from model.load import resolve_device

    # 1. check every input before any model is loaded: never half a result
    ts = [Target(p, curves_wanted) for p in targets]
    for t, label in zip(ts, _unique_labels([t.label for t in ts])):
        t.label = label
    files = held_out_files(data, ts)
    try:
        tasks = Evaluator(None, files, max_examples).tasks  # every held-out file read and checked now
    except ValueError as e:
        raise EvalError(str(e)) from None
    n_examples = {t.set_name: len(t.rows) for t in tasks}
    generation_sets = [t.set_name for t in tasks if isinstance(t, GenerationTask)]
    verdicts = {t.set_name: t.verdicts for t in tasks if isinstance(t, GenerationTask)}
    if base == "auto":
        base = next((t.hydra.get("model", {}).get("path") for t in ts if t.hydra.get("model", {}).get("path")), None)
    elif str(base).lower() in ("none", "null", "false", ""):
        base = None
    base_target = Target(_repo_path(base), want_curves=False) if base else None
    if out is None:
        first_run = next((t.run_dir for t in ts if t.is_run), None)
        if first_run and len(ts) == 1:
            out = first_run
        elif first_run:
            out = os.path.join(first_run, "comparison")
        else:
            out = os.path.join(os.getcwd(), "eval_" + "_vs_".join(t.label.replace("/", "_") for t in ts))
    curve_data = {t.label: curves(t) for t in ts if t.is_run and curves_wanted}
    os.makedirs(out, exist_ok=True)
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise EvalError(str(e)) from None

    # 2. the base (reference for KL and the implicit preference reward), then each model in turn
    stats_models, details, metrics_by = {}, {}, {}
    evaluator = base_tok = None
    if base_target is not None:
        log(f"[evaluate] base {base_target.model_dir}")
        model, base_tok, info = load_for_eval(base_target.model_dir, device=dev)
        evaluator = Evaluator(base_tok, files, max_examples, kl_examples, max_new_tokens)
        base_vocab = model.config.vocab_size
        metrics_by["base"], details["base"] = evaluator.evaluate(model)
        log(f"[evaluate] base: {metrics_by['base']}")
        stats_models["base"] = {"path": base, "model_dir": base_target.model_dir, "kind": "base", **info,
                                "metrics": metrics_by["base"]}
        del model
        gc.collect()
    for t in ts:
        log(f"[evaluate] {t.label}: {t.model_dir}")
        model, tok, info = load_for_eval(t.model_dir, device=dev)
        relative = evaluator is not None and model.config.vocab_size == base_vocab and _same_tokenizer(tok, base_tok)
        if relative:
            m, d = evaluator.evaluate(model, tok)
        else:  # no base (or an incompatible tokenizer): nothing to be relative to
            m, d = Evaluator(tok, files, max_examples, kl_examples, max_new_tokens).evaluate(model)
            m.pop("kl", None)
            m.pop("preference_gap", None)
            if "preference" in d:
                margins = torch.tensor(d["preference"]["margins"])
                m["preference_accuracy"] = pair_accuracy(margins)
        metrics_by[t.label], details[t.label] = m, d
        stats_models[t.label] = {"path": t.path, "model_dir": t.model_dir, "kind": "run" if t.is_run else "model",
                                 "method": t.method, **info, "metrics": m, "relative_to_base": bool(relative)}
        log(f"[evaluate] {t.label}: {m}")
        del model
        gc.collect()

    # 3. every number behind the plots
    labels = list(details)
    lengths = {k: [n for s in generation_sets if s in details[k] for n in details[k][s]["lengths"]] for k in labels}
    longest = max([max_new_tokens] + [n for v in lengths.values() for n in v])
    length_hist = histograms(lengths, edges=list(range(0, longest + 2)))  # one bin per token count
    for k, h in length_hist.items():
        gen = [details[k][s] for s in generation_sets if s in details[k]]
        h["truncated_rate"] = round(sum(sum(g["truncated"]) for g in gen) / max(h["n"], 1), 4)
        h["mean_by_set"] = {s: float(sum(details[k][s]["lengths"]) / max(len(details[k][s]["lengths"]), 1))
                            for s in generation_sets if s in details[k]}
    ppl_hist = histograms({k: details[k]["sft"]["perplexities"] for k in labels if "sft" in details[k]})
    for k, h in ppl_hist.items():
        h["perplexity"] = metrics_by[k].get("perplexity")  # token-weighted, as in eval.json
        h["tokens"] = details[k]["sft"]["tokens"]
    comparison = {k: dict(metrics_by[k]) for k in labels}
    for k in labels:
        if k in length_hist:
            comparison[k]["mean_response_length"] = round(length_hist[k]["mean"], 3)
    eval_json = {}
    for t in ts:
        p = os.path.join(t.run_dir, "eval.json") if t.is_run else None
        if p and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                eval_json[t.label] = json.load(f)
    stats = {
        "settings": {"max_examples": max_examples, "max_new_tokens": max_new_tokens, "kl_examples": kl_examples,
                     "device": str(dev), "base": base, "greedy": True,
                     "preference_accuracy": "implicit reward relative to the base (ties ½)" if base else
                                            "share of pairs with log π(chosen) > log π(rejected) (ties ½)"},
        "data": {name: {"path": p, "n": n_examples[name]} for name, p in files.items()},
        "models": stats_models,
        "eval_json": eval_json,
        "training_curves": curve_data,
        "perplexity_distribution": ppl_hist,
        "response_lengths": length_hist,
        "model_comparison": {"models": labels, "values": comparison, "examples": n_examples},
        "files": {name: os.path.join(out, name) for name in OUTPUT_FILES},
    }

    # 4. sample responses: the first `samples` prompts of each generation set, every model's answer
    first, sample_rows = next(iter(details.values())), []
    for s in generation_sets:
        if s not in first:
            continue
        for i in range(min(samples, len(first[s]["prompts"]))):
            row = {"set": s, "prompt": first[s]["prompts"][i]}
            if "answers" in first[s]:
                row["answer"] = first[s]["answers"][i]
            row["responses"] = {}
            for k in labels:
                d = details[k][s]
                row["responses"][k] = {"text": d["texts"][i], "tokens": d["lengths"][i],
                                       "truncated": d["truncated"][i], **{v: d[v][i] for v in verdicts[s]}}
            sample_rows.append(row)

    # 5. write: the JSON first, then the figures drawn from it
    from evaluation import plots

    with open(os.path.join(out, "evaluation_stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out, "sample_responses.json"), "w", encoding="utf-8") as f:
        json.dump({"models": labels, "max_new_tokens": max_new_tokens, "samples": sample_rows}, f, indent=1,
                  ensure_ascii=False)
    plots.render_all(stats, out)
    log(f"[evaluate] wrote {', '.join(OUTPUT_FILES)} to {out}")
    return stats


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    try:
        o = parse_args(argv)
        run_evaluation(o["targets"], data=o["data"], out=o["out"], base=o["base"], max_examples=o["max_examples"],
                       max_new_tokens=o["max_new_tokens"], samples=o["samples"], curves_wanted=o["curves"],
                       device=o["device"], kl_examples=o["kl_examples"])
    except (EvalError, DataError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message held
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
