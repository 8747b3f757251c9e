"""The four figures of `python evaluate.py`, drawn from evaluation_stats.json alone.

Every function takes the stats dictionary that evaluate.py writes (or one section of it) and returns
a matplotlib Figure; nothing here computes a number that is not in the JSON, so a figure can be
redrawn (or restyled in a notebook) from the file without a model, and the tests can check that
what a figure shows is exactly what the JSON holds. Histograms are drawn with `stairs` over the
stored bin edges and counts; curves with `plot` over the stored steps and values; bars from the
stored metric values.

The Agg backend is used unless a backend was already chosen (a notebook's inline backend stays).
"""
from __future__ import annotations

import math
import os

import matplotlib

if "MPLBACKEND" not in os.environ and not matplotlib.get_backend().lower().startswith(("module://", "agg")):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# metric key -> (panel title, y-axis label with units)
CURVE_LABELS = {
    "loss": ("Training loss", "loss (nats)"),
    "rewards/margins": ("Implicit reward margin (chosen − rejected)", "β · log-ratio margin (nats)"),
    "rewards/accuracies": ("Reward accuracy (chosen ranked above rejected)", "share of pairs"),
    "rewards/chosen": ("Implicit reward of chosen answers", "β · log-ratio (nats)"),
    "rewards/rejected": ("Implicit reward of rejected answers", "β · log-ratio (nats)"),
    "reward": ("Mean reward of the sampled completions", "reward (sum of weighted rewards)"),
    "reward_std": ("Reward spread", "std of rewards"),
    "kl": ("KL to the reference policy (training estimate)", "nats per token"),
    "entropy": ("Policy entropy on completion tokens", "nats per token"),
    "completion_length/mean": ("Mean completion length", "tokens"),
    "frac_reward_zero_std": ("Groups whose rewards all tie", "share of groups"),
    "nll": ("NLL of the chosen answers", "nats per token"),
    "grad_norm": ("Gradient norm (before clipping)", "L2 norm"),
    "lr": ("Learning rate", "lr"),
}

# the y label of the loss panel, by method (what its loss measures)
LOSS_UNITS = {"sft": "NLL (nats per completion token)", "pretrain": "NLL (nats per token)",
              "dpo": "−log σ(β·margin) (nats per pair)", "kto": "KTO loss (per example)",
              "orpo": "NLL + λ·odds-ratio term (nats)", "cpo": "preference term + NLL (nats)",
              "simpo": "−log σ(β·Δavg − γ) (nats per pair)",
              "grpo": "clipped surrogate (≈ 0 on-policy; per token)", "rl": "policy-gradient surrogate"}

# held-out metric -> (label, unit); the first group shares one 0..1 axis
RATE_METRICS = ("accuracy", "format_rate", "multistep_accuracy", "process_score", "refusal_rate", "style_rate",
                "preference_accuracy")
OTHER_METRICS = {"perplexity": ("Perplexity of reference answers", "exp(mean NLL per answer token)"),
                 "kl": ("KL to the base model", "nats per token"),
                 "preference_gap": ("Implicit reward gap vs. base", "nats per pair"),
                 "mean_response_length": ("Mean response length", "tokens")}


def _message(fig, ax, text: str):
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True, transform=ax.transAxes)
    return fig


def _colors(labels) -> dict:
    """One colour per model label, the same in every figure (labels in the comparison's order)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def training_curves(section: dict, order: list[str] | None = None):
    """section: stats["training_curves"] = {label: {"method", "steps", "series": {key: [...]}, "plotted": [...]}}.

    One panel per plotted metric (the union over runs, in order), one line per run.
    """
    runs = {k: v for k, v in section.items() if v.get("steps")}
    keys = []
    for run in runs.values():
        keys += [k for k in run["plotted"] if k not in keys]
    rank = {k: i for i, k in enumerate(CURVE_LABELS)}
    keys.sort(key=lambda k: rank.get(k, len(rank)))  # loss first, grad_norm / lr last, whatever the run order
    if not keys:
        fig, ax = plt.subplots(figsize=(7, 3))
        fig.suptitle("Training curves")
        return _message(fig, ax, "no training curves: the evaluated models are not run directories "
                                 "(metrics.jsonl is read from a run directory)")
    cols = 2 if len(keys) > 1 else 1
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    methods = sorted({r.get("method") or "?" for r in runs.values()})
    source = " from metrics.jsonl" if all(r.get("path") for r in runs.values()) else ""
    fig.suptitle(f"Training curves ({', '.join(methods)}){source}")
    color = _colors(order or list(section))
    for ax, key in zip(axes.flat, keys):
        title, ylabel = CURVE_LABELS.get(key, (key, key))
        if key == "loss":
            ylabel = LOSS_UNITS.get(methods[0], ylabel) if len(methods) == 1 else "loss (each run's own objective)"
        for label, run in runs.items():
            if key not in run["series"]:
                continue
            xs, ys = zip(*[(s, v) for s, v in zip(run["steps"], run["series"][key]) if v is not None])
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4, label=label,
                    color=color[label])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")

    return fig


def _histograms(section: dict, title: str, xlabel: str, ylabel: str, limit: float | None = None, limit_label: str = "",
                order: list[str] | None = None):
    """section: {label: {"edges": [...], "counts": [...], "median": x, "n": n}}; one step line per model."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.set_title(title)
    drawn = False
    color = _colors(order or list(section))
    for label, h in section.items():
        if not h.get("counts"):
            continue
        style = ("-", "--", ":", "-.")[len(ax.patches) % 4]
        ax.stairs(h["counts"], h["edges"], linewidth=1.8, linestyle=style, fill=False, color=color[label],
                  label=f"{label} (n={h['n']}, median {h['median']:.3g})")
        drawn = True
    if not drawn:
        return _message(fig, ax, f"{title}: nothing to show (no held-out examples of this kind)")
    if limit is not None:
        ax.axvline(limit, color="grey", linestyle="--", linewidth=1, label=limit_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def perplexity_distribution(section: dict, order: list[str] | None = None):
    """section: stats["perplexity_distribution"]."""
    return _histograms(section, "Per-example perplexity on the held-out reference answers",
                       "perplexity of one reference answer (exp of mean NLL per answer token)", "examples",
                       order=order)


def response_lengths(section: dict, max_new_tokens: int | None = None, order: list[str] | None = None):
    """section: stats["response_lengths"]; the dashed line is the generation limit."""
    return _histograms(section, "Length of the greedy responses to the held-out prompts",
                       "response length (tokens, stop token included)", "responses",
                       limit=max_new_tokens, limit_label=f"max_new_tokens = {max_new_tokens}", order=order)


def model_comparison(section: dict):
    """section: stats["model_comparison"] = {"models": [...], "values": {model: {metric: value}}}.

    Left: the rates (0..1) as grouped bars; right: one small panel per other metric.
    """
    models, values = section["models"], section["values"]
    rates = [m for m in RATE_METRICS if any(values[k].get(m) is not None for k in models)]
    others = [m for m in OTHER_METRICS if any(values[k].get(m) is not None for k in models)]
    n_panels = (1 if rates else 0) + len(others)
    if not n_panels:
        fig, ax = plt.subplots(figsize=(7, 3))
        fig.suptitle("Model comparison")
        return _message(fig, ax, "no held-out metrics were measured")
    # rates across the top row, one small panel per other metric (its own unit) below
    fig = plt.figure(figsize=(max(8.0, 2.6 * max(len(others), 1) + 1, 1.3 * len(rates) * max(len(models), 2) / 2),
                              4.2 * (bool(rates) + bool(others))))
    grid = fig.add_gridspec(bool(rates) + bool(others), max(len(others), 1))
    axes = []
    if rates:
        axes.append(fig.add_subplot(grid[0, :]))
    if others:
        axes += [fig.add_subplot(grid[int(bool(rates)), j]) for j in range(len(others))]
    fig.suptitle("Held-out metrics side by side (" + ", ".join(models) + ")")
    if section.get("examples"):
        sizes = ", ".join(f"{k} {n}" for k, n in section["examples"].items())
        fig.text(0.5, -0.01, f"held-out examples per set: {sizes}", ha="center", fontsize=8, color="dimgray")
    color = _colors(models)
    width = 0.8 / max(len(models), 1)
    if rates:
        ax = axes.pop(0)
        for i, model in enumerate(models):
            ys = [values[model].get(m) for m in rates]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(rates))]
            bars = ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                          label=model, color=color[model])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(rates)), [m.replace("_", " ") for m in rates], fontsize=9)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("share of held-out examples (0–1)")
        ax.set_title("Task rates, judged by the training verifiers", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax, metric in zip(axes, others):
        title, unit = OTHER_METRICS[metric]
        pairs = [(i, m, values[m].get(metric)) for i, m in enumerate(models)]
        pairs = [p for p in pairs if p[2] is not None]
        bars = ax.bar([m for _, m, _ in pairs], [v for _, _, v in pairs],
                      color=[color[m] for _, m, _ in pairs])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig, path: str) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def render_all(stats: dict, out_dir: str) -> dict:
    """Write the four PNGs of an evaluation into out_dir; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    order = stats["model_comparison"]["models"]
    figures = {
        "training_curves": training_curves(stats["training_curves"], order),
        "perplexity_distribution": perplexity_distribution(stats["perplexity_distribution"], order),
        "response_lengths": response_lengths(stats["response_lengths"], stats["settings"].get("max_new_tokens"), order),
        "model_comparison": model_comparison(stats["model_comparison"]),
    }
    return {name: save(fig, os.path.join(out_dir, name + ".png")) for name, fig in figures.items()}
