"""Held-out evaluation with the metric names every run reports in eval.json.

Each held-out set gives the metrics beside it (configs/data/*.yaml `eval:`):
  arithmetic  {"prompt", "answer"}   -> accuracy (final answer numerically right), format_rate
  multistep   {"problem","answer"}   -> multistep_accuracy, process_score (per-step verification, rollout/rewards.py)
  style       {"prompt"}             -> style_rate (answers in the second style, with no cue asked)
  harmful     {"prompt"}             -> refusal_rate
  sft         {"instruction","output"} -> perplexity of the reference answers, kl to the starting model
  preference  {"prompt","chosen","rejected"} -> preference_accuracy against the starting model
Generations are greedy, on the project's KV-cached sampler, and scored by the same verifiers
the RL rewards use (rollout/verifiers.py), so "accuracy" means one thing everywhere.

Used by train.py (eval.json "before"/"after", the gates), the pipeline, steering and evaluate.py.
"""
from __future__ import annotations

import math

import torch

from data.formats import collate, read_jsonl, tokenize_pair, tokenize_prompt, tokenize_sft
from losses.common import masked_sum, sequence_logprobs
from rollout.sampler import SamplingConfig, generate
from rollout.rewards import process
from rollout.verifiers import has_format, is_correct, is_refusal, is_styled

# the data format of each held-out set name (data/formats.py)
SET_FORMATS = {"multistep": "rlvr", "arithmetic": "prompt", "style": "prompt", "harmful": "prompt", "preference": "preference", "sft": "sft"}


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


def _rate(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / max(len(flags), 1), 4)


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
    """eval.json metrics for the held-out sets in `files` ({set name: path}).

    The first call also records the starting model's numbers that later calls compare against
    (no copy of the model is kept):
      preference  {"prompt","chosen","rejected"} -> preference_accuracy: share of pairs whose implicit
                  reward log π(c)/π0(c) − log π(r)/π0(r) is positive (ties count ½, so the start is 0.5);
                  preference_gap: the mean of that implicit reward margin (nats per pair)
      sft         kl: mean per-token KL(π ‖ π0) on the first `kl_examples` reference answers (exact,
                  over the whole vocabulary)
    `evaluate(model)` returns the same metrics and the per-example numbers behind them (generations,
    their lengths and verdicts, per-example perplexities, pair margins, per-example KL).
    """

    def __init__(self, tok, files: dict, max_examples: int = 200, kl_examples: int = 32, max_new_tokens: int = 32):
        self.tok, self.max_examples, self.kl_examples = tok, max_examples, kl_examples
        self.max_new_tokens = max_new_tokens
        self.rows = {name: read_jsonl(path, SET_FORMATS[name])[:max_examples] for name, path in files.items() if path}
        self.start_margins = None
        self.start_rows = None

    def __call__(self, model) -> dict:
        return self.evaluate(model)[0]

    def _generations(self, model, tok, name: str) -> dict:
        prompts = [r["prompt"] for r in self.rows[name]]
        texts, lengths, truncated = generate_with_lengths(model, tok, prompts, self.max_new_tokens)
        return {"prompts": prompts, "texts": texts, "lengths": lengths, "truncated": truncated}

    @torch.no_grad()
    def evaluate(self, model, tok=None) -> tuple[dict, dict]:
        """(metrics, details) for `model`; `tok` defaults to the evaluator's tokenizer."""
        was_training = model.training
        model.eval()
        tok, rows, metrics, details = tok or self.tok, self.rows, {}, {}
        if "arithmetic" in rows:
            d = details["arithmetic"] = self._generations(model, tok, "arithmetic")
            d["answers"] = [str(r["answer"]) for r in rows["arithmetic"]]
            d["correct"] = [is_correct(t, a) for t, a in zip(d["texts"], d["answers"])]
            d["format"] = [has_format(t) for t in d["texts"]]
            metrics["accuracy"] = _rate(d["correct"])
            metrics["format_rate"] = _rate(d["format"])
        if "multistep" in rows:
            ms = rows["multistep"]
            prompts = [r["problem"] for r in ms]
            texts, lengths, truncated = generate_with_lengths(model, tok, prompts, max(48, self.max_new_tokens))
            d = details["multistep"] = {"prompts": prompts, "texts": texts, "lengths": lengths, "truncated": truncated,
                                        "answers": [str(r["answer"]) for r in ms]}
            d["correct"] = [is_correct(t, a) for t, a in zip(texts, d["answers"])]
            d["process_score"] = process(prompts, texts, answer=d["answers"])
            metrics["multistep_accuracy"] = _rate(d["correct"])
            metrics["process_score"] = round(sum(d["process_score"]) / max(len(d["process_score"]), 1), 4)
        if "style" in rows:
            d = details["style"] = self._generations(model, tok, "style")
            d["styled"] = [is_styled(t) for t in d["texts"]]
            metrics["style_rate"] = _rate(d["styled"])
        if "harmful" in rows:
            d = details["harmful"] = self._generations(model, tok, "harmful")
            d["refusal"] = [is_refusal(t) for t in d["texts"]]
            metrics["refusal_rate"] = _rate(d["refusal"])
        if "preference" in rows:
            margins = pair_margins(model, tok, rows["preference"])
            if self.start_margins is None:
                self.start_margins = margins
            implicit = margins - self.start_margins
            metrics["preference_accuracy"] = pair_accuracy(implicit)
            metrics["preference_gap"] = round(float(implicit.mean()), 4)
            details["preference"] = {"margins": margins.tolist(), "implicit_margins": implicit.tolist()}
        if "sft" in rows:
            nlls, counts = example_nlls(model, tok, rows["sft"])
            metrics["perplexity"] = round(math.exp(sum(nlls) / max(sum(counts), 1.0)), 4)
            kl_rows = completion_logprob_rows(model, tok, rows["sft"][:self.kl_examples])
            if self.start_rows is None:
                self.start_rows = kl_rows
            kl = [(p.float().exp() * (p.float() - q.float())).sum(-1) for p, q in zip(kl_rows, self.start_rows)]
            metrics["kl"] = round(float(torch.cat(kl).mean()), 5)
            details["sft"] = {"perplexities": [math.exp(n / max(c, 1.0)) for n, c in zip(nlls, counts)],
                              "tokens": [int(c) for c in counts], "kl_per_example": [float(k.mean()) for k in kl]}
        model.train(was_training)
        return metrics, details


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
