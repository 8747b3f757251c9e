"""Task `preference`: held-out preference pairs, scored by the model's implicit reward.

Metrics, relative to the starting model (the first call records its margins; no copy is kept):
`preference_accuracy`, the share of pairs whose implicit reward log π(c)/π0(c) − log π(r)/π0(r) is
positive (ties count ½, so the start scores 0.5), and `preference_gap`, that margin's mean (nats).
"""
from __future__ import annotations

from tasks import Task, register_task


@register_task("preference")
class Preference(Task):
    data_format = "preference"
    metrics = ("preference_accuracy", "preference_gap")

    def evaluate(self, model, tok, start, settings):
        from evaluation.metrics import pair_accuracy, pair_margins

        margins = pair_margins(model, tok, self.rows)
        start.setdefault("margins", margins)
        implicit = margins - start["margins"]
        metrics = {"preference_accuracy": pair_accuracy(implicit), "preference_gap": round(float(implicit.mean()), 4)}
        details = {"margins": margins.tolist(), "implicit_margins": implicit.tolist()}
        return {self.metric_name(k): v for k, v in metrics.items()}, details
