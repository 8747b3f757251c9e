"""Held-out evaluation: the Evaluator (a loop over tasks/), the measuring helpers tasks share, gates.

Each held-out set is a task (tasks/: arithmetic, multistep, style, harmful, sft, preference, and your
own by config) with stable metric names in eval.json. Generations are greedy, on the project's
KV-cached sampler, and judged by the same functions the RL rewards use, so "accuracy" means one
thing everywhere. Used by the train program (eval.json "before"/"after", the gates), the
pipeline, steering and evaluate.py.
"""
from __future__ import annotations

import math

import torch

from data.formats import collate, tokenize_pair, tokenize_prompt, tokenize_sft
from losses.common import masked_sum, sequence_logprobs
from rollout.sampler import SamplingConfig, generate


@torch.no_grad()
def generate_texts(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy completions of chat prompts (the chat template and generation prompt are applied)."""
    return generate_with_lengths(model, tok, prompts, max_new_tokens, batch_size)[0]


@torch.no_grad()
def generate_with_lengths(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64):
    """Greedy completions, their lengths in tokens (stop token included) and whether each hit max_new_tokens."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    texts, lengths, truncated = [], [], []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenize_prompt(p, tok) for p in prompts[i:i + batch_size]]
        roll = generate(model, ids, cfg, stop_token_ids=tok.stop_token_ids, pad_id=tok.pad_token_id, tokenizer=tok)
        texts.extend(roll.texts(tok))
        lengths.extend(int(n) for n in roll.mask.sum(1).tolist())
        truncated.extend(bool(t) for t in roll.truncated.tolist())
    return texts, lengths, truncated


@torch.no_grad()
def perplexity(model, tok, examples: list[dict], max_length: int = 256, batch_size: int = 32) -> float:
    """exp(mean NLL per completion token) of the reference outputs."""
    device = next(model.parameters()).device
    nll, ntok = 0.0, 0.0
    tokenized = [tokenize_sft(ex, tok, max_length) for ex in examples]
    for i in range(0, len(tokenized), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenized[i:i + batch_size], tok.pad_token_id).items()}
        logp, mask = sequence_logprobs(model, batch["input_ids"], batch["loss_mask"])
        nll += float(masked_sum(-logp, mask))
        ntok += float(mask.sum())
    return math.exp(nll / max(ntok, 1.0))


@torch.no_grad()
def example_nlls(model, tok, examples: list[dict], max_length: int = 256, batch_size: int = 32):
    """Per example: (summed NLL of the reference completion tokens, number of those tokens).

    exp(nll / tokens) is the example's perplexity; exp(sum nll / sum tokens) is `perplexity`.
    """
    device = next(model.parameters()).device
    nlls, counts = [], []
    tokenized = [tokenize_sft(ex, tok, max_length) for ex in examples]
    for i in range(0, len(tokenized), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenized[i:i + batch_size], tok.pad_token_id).items()}
        logp, mask = sequence_logprobs(model, batch["input_ids"], batch["loss_mask"])
        nlls.extend(masked_sum(-logp, mask, dim=1).tolist())
        counts.extend(mask.sum(1).tolist())
    return nlls, counts


def pair_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs with a positive margin, ties counted ½."""
    return round(float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean()), 4)


@torch.no_grad()
def pair_margins(model, tok, rows: list[dict], max_length: int = 256, batch_size: int = 32) -> torch.Tensor:
    """Sequence log-prob of chosen minus rejected, per pair (completion tokens only)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        seqs = [tokenize_pair(r["prompt"], r["chosen"], tok, max_length) for r in chunk] + \
               [tokenize_pair(r["prompt"], r["rejected"], tok, max_length) for r in chunk]
        b = {k: v.to(device) for k, v in collate(seqs, tok.pad_token_id).items()}
        logp, mask = sequence_logprobs(model, b["input_ids"], b["loss_mask"])
        sums = masked_sum(logp, mask, dim=1)
        out.append((sums[:len(chunk)] - sums[len(chunk):]).cpu())
    return torch.cat(out)


@torch.no_grad()
def completion_logprob_rows(model, tok, rows: list[dict], max_length: int = 256) -> list[torch.Tensor]:
    """Full next-token log-prob rows (n_completion_tokens, V) per example, for exact KL; stored in bf16 on CPU."""
    device = next(model.parameters()).device
    out = []
    for r in rows:
        ex = tokenize_sft(r, tok, max_length)
        ids = torch.tensor([ex["input_ids"]], device=device)
        pos = torch.tensor(ex["loss_mask"][1:], dtype=torch.bool, device=device)
        hidden = model(ids, hidden_only=True)[0, :-1][pos]
        out.append(torch.log_softmax((hidden @ model.lm_head_weight.t()).float(), -1).to("cpu", torch.bfloat16))
    return out


class Evaluator:
    """eval.json metrics of a run: a loop over its held-out tasks (tasks/).

    `sets` maps set names to a file (evaluated as the task of that name) or to {task, path, options}.
    The first call also records the starting model's numbers that relative metrics compare against
    (`kl`, `preference_accuracy`; no copy of the model is kept). `evaluate(model)` returns the
    metrics and the per-example numbers behind them (generations, verdicts, perplexities, margins).
    """

    def __init__(self, tok, sets: dict, max_examples: int = 200, kl_examples: int = 32, max_new_tokens: int = 32):
        from tasks import build_task

        self.tok = tok
        self.tasks = [build_task(name, spec, max_examples) for name, spec in sets.items() if spec]
        self.settings = {"max_new_tokens": max_new_tokens, "kl_examples": kl_examples}
        self.start: dict[str, dict] = {}

    def __call__(self, model) -> dict:
        return self.evaluate(model)[0]

    @torch.no_grad()
    def evaluate(self, model, tok=None) -> tuple[dict, dict]:
        """(metrics, details) for `model`; `tok` defaults to the evaluator's tokenizer."""
        was_training = model.training
        model.eval()
        metrics, details = {}, {}
        for task in self.tasks:
            m, d = task.evaluate(model, tok or self.tok, self.start.setdefault(task.set_name, {}), self.settings)
            metrics.update(m)
            details[task.set_name] = d
        model.train(was_training)
        return metrics, details


def held_out_sets(cfg) -> dict:
    """A run's held-out sets: data.eval plus the method's extra_eval (null entries skipped)."""
    return {k: v for k, v in {**cfg.data.eval, **cfg.method.extra_eval}.items() if v}


def check_gates(metrics: dict, gates: dict) -> dict:
    """Quality gates: `kl` (and any name ending in `kl`) is a maximum, every other metric a minimum.

    Returns {name: {"value", "threshold", "pass"}}; a metric that was not measured fails.
    """
    report = {}
    for name, threshold in gates.items():
        value = metrics.get(name)
        upper = name == "kl" or name.endswith("_kl")
        ok = value is not None and (value <= threshold if upper else value >= threshold)
        report[name] = {"value": value, "threshold": threshold, "max" if upper else "min": True, "pass": ok}
    return report


def gate_line(name: str, g: dict) -> str:
    """One gate of check_gates' report as printed: `gate kl: 0.03 (<= 0.1) PASS`."""
    return f"gate {name}: {g['value']} ({'<=' if 'max' in g else '>='} {g['threshold']}) {'PASS' if g['pass'] else 'FAIL'}"
