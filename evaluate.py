"""Held-out evaluation with the metric names every run reports in eval.json.

Each held-out set gives the metrics beside it (configs/data/*.yaml `eval:`):
  arithmetic  {"prompt", "answer"}   -> accuracy (final answer numerically right), format_rate
  style       {"prompt"}             -> style_rate (answers in the second style, with no cue asked)
  harmful     {"prompt"}             -> refusal_rate
  sft         {"instruction","output"} -> perplexity of the reference answers, kl to the starting model
  preference  {"prompt","chosen","rejected"} -> preference_accuracy against the starting model
Generations are greedy, on the project's KV-cached sampler, and scored by the same verifiers
the RL rewards use (rollout/verifiers.py), so "accuracy" means one thing everywhere.
"""
from __future__ import annotations

import math

import torch

from data.formats import collate, read_jsonl, tokenize_pair, tokenize_prompt, tokenize_sft
from losses.common import masked_sum, sequence_logprobs
from rollout.sampler import SamplingConfig, generate
from rollout.verifiers import has_format, is_correct, is_refusal, is_styled


@torch.no_grad()
def generate_texts(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy completions of chat prompts (the chat template and generation prompt are applied)."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenize_prompt(p, tok) for p in prompts[i:i + batch_size]]
        roll = generate(model, ids, cfg, stop_token_ids=tok.stop_token_ids, pad_id=tok.pad_token_id, tokenizer=tok)
        out.extend(roll.texts(tok))
    return out


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


def _rate(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / max(len(flags), 1), 4)


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


def _rate(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / max(len(flags), 1), 4)


class Evaluator:
    """eval.json metrics for the held-out sets in `files` ({set name: path}).

    The first call also records the starting model's numbers that later calls compare against
    (no copy of the model is kept):
      preference  {"prompt","chosen","rejected"} -> preference_accuracy: share of pairs whose implicit
                  reward log π(c)/π0(c) − log π(r)/π0(r) is positive (ties count ½, so the start is 0.5);
                  preference_gap: the mean of that implicit reward margin (nats per pair)
      sft         kl: mean per-token KL(π ‖ π0) on the first `kl_examples` reference answers (exact,
                  over the whole vocabulary)
    """

    def __init__(self, tok, files: dict, max_examples: int = 200, kl_examples: int = 32):
        self.tok, self.max_examples, self.kl_examples = tok, max_examples, kl_examples
        self.rows = {name: read_jsonl(path, FORMATS[name])[:max_examples] for name, path in files.items() if path}
        self.start_margins = None
        self.start_rows = None

    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        tok, rows, metrics = self.tok, self.rows, {}
        if "arithmetic" in rows:
            texts = generate_texts(model, tok, [r["prompt"] for r in rows["arithmetic"]])
            metrics["accuracy"] = _rate(is_correct(t, str(r["answer"])) for t, r in zip(texts, rows["arithmetic"]))
            metrics["format_rate"] = _rate(has_format(t) for t in texts)
        if "style" in rows:
            metrics["style_rate"] = _rate(is_styled(t) for t in generate_texts(model, tok, [r["prompt"] for r in rows["style"]]))
        if "harmful" in rows:
            metrics["refusal_rate"] = _rate(is_refusal(t) for t in generate_texts(model, tok, [r["prompt"] for r in rows["harmful"]]))
        if "preference" in rows:
            margins = pair_margins(model, tok, rows["preference"])
            if self.start_margins is None:
                self.start_margins = margins
            implicit = margins - self.start_margins
            metrics["preference_accuracy"] = round(float(((implicit > 0).float() + 0.5 * (implicit == 0).float()).mean()), 4)
            metrics["preference_gap"] = round(float(implicit.mean()), 4)
        if "sft" in rows:
            metrics["perplexity"] = round(perplexity(model, tok, rows["sft"]), 4)
            kl_rows = completion_logprob_rows(model, tok, rows["sft"][:self.kl_examples])
            if self.start_rows is None:
                self.start_rows = kl_rows
            kl = [(p.float().exp() * (p.float() - q.float())).sum(-1) for p, q in zip(kl_rows, self.start_rows)]
            metrics["kl"] = round(float(torch.cat(kl).mean()), 5)
        model.train(was_training)
        return metrics


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


FORMATS = {"arithmetic": "prompt", "style": "prompt", "harmful": "prompt", "preference": "preference", "sft": "sft"}


def evaluate_model(model, tok, files: dict, max_examples: int = 200) -> dict:
    """One-off evaluation (no starting model to compare with: preference_accuracy and kl are relative to itself)."""
    return Evaluator(tok, files, max_examples)(model)
