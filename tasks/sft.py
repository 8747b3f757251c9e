"""Task `sft`: reference answers, scored by likelihood instead of generation.

Metrics: `perplexity`, exp(mean NLL per completion token) of the reference outputs, and `kl`: the
mean per-token KL(π ‖ π0) to the starting model on the first `kl_examples` (an evaluator setting,
32) reference answers,
exact over the whole vocabulary (the first call records π0's rows; no copy of the model is kept).
"""
from __future__ import annotations

import math

import torch

from tasks import Task, register_task


@register_task("sft")
class ReferenceAnswers(Task):
    data_format = "sft"
    metrics = ("perplexity", "kl")

    def evaluate(self, model, tok, start, settings):
        from evaluation.metrics import completion_logprob_rows, example_nlls

        nlls, counts = example_nlls(model, tok, self.rows)
        kl_rows = completion_logprob_rows(model, tok, self.rows[:settings.get("kl_examples", 32)])
        start.setdefault("rows", kl_rows)
        kl = [(p.float().exp() * (p.float() - q.float())).sum(-1) for p, q in zip(kl_rows, start["rows"])]
        metrics = {"perplexity": round(math.exp(sum(nlls) / max(sum(counts), 1.0)), 4),
                   "kl": round(float(torch.cat(kl).mean()), 5)}
        details = {"perplexities": [math.exp(n / max(c, 1.0)) for n, c in zip(nlls, counts)],
                   "tokens": [int(c) for c in counts], "kl_per_example": [float(k.mean()) for k in kl]}
        return {self.metric_name(k): v for k, v in metrics.items()}, details
