"""Held-out tasks: one object per task, holding everything that defines it.

A task is its data format, its judge (a pure function of a response), the metrics it reports, the
reward that trains toward it and the marker strings its judge looks for. Evaluation is a loop over
tasks (evaluation/metrics.py `Evaluator`); the RL rewards, steering's behaviour judges and the
synthetic data generator import their markers and judges from here, so the world that writes the
data and the judge that reads the model cannot drift apart.

    arithmetic  {"prompt", "answer"}            accuracy, format_rate          reward math_answer, format
    multistep   {"problem", "answer"}           multistep_accuracy, process_score   reward process
    style       {"prompt"}                      style_rate                     reward style
    harmful     {"prompt"}                      refusal_rate
    sft         {"instruction","output"}        perplexity, kl (to the starting model)
    preference  {"prompt","chosen","rejected"}  preference_accuracy, preference_gap (vs the start)
    exact_match {"prompt","answer"}             exact_match (a user's own QA set, by config)

The held-out sets of a run are `data.eval` (+ `method.extra_eval`): `NAME: FILE` evaluates FILE as
task NAME; `NAME: {task: TASK, path: FILE, OPTION: ...}` evaluates it as TASK (`split`, `subset`, `columns`
of a dataset source are read by data/hf.py, not passed to the task) (a registered name or
`module:Class`), its metrics prefixed `NAME/` when NAME is not the task's own name. A new task is
one file: a `Task` subclass registered with `@register_task("name")` (or referenced as
`module:Class` from the config, with no registration at all).
"""
from __future__ import annotations

import importlib
import inspect

from data.formats import read_jsonl
from trainer.config import registrar

TASKS: dict[str, type] = {}


# class decorator: a held-out task under `name` (the data.eval key that selects it by default)
register_task = registrar(TASKS, "a task named", "name")


def get_task(name: str) -> type:
    """A task class by registered name or `module:Class`."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task {name!r}: cannot import {attr} from {module} ({e})") from None
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))} "
                         "(or give module:Class)")
    return TASKS[name]


class Task:
    """A held-out task over one file. Subclasses set the class attributes and `evaluate`."""

    name = ""                 # registry name (set by register_task)
    data_format = "prompt"    # data/formats.py format of its file
    metrics: tuple = ()       # the eval.json names it reports
    reward: str | None = None  # the registered reward that trains toward it (rollout/rewards.py)
    markers: tuple = ()       # strings its judge looks for (steering picks first tokens from them)
    required: tuple = ()      # fields every row must have (beyond what the data format requires)

    def __init__(self, path: str, set_name: str | None = None, max_examples: int = 200, **options):
        params = inspect.signature(type(self).configure).parameters
        unknown = sorted(set(options) - set(params) - {"self"})
        if unknown:
            raise ValueError(f"data.eval.{set_name or self.name}: unknown option(s) {unknown} for task "
                             f"{self.name!r}; valid: {sorted(set(params) - {'self'})}")
        self.path, self.set_name = path, set_name or self.name
        self.configure(**options)
        self.rows = read_jsonl(path, self.data_format)[:max_examples]
        for field in self.required:
            missing = next((i for i, r in enumerate(self.rows) if r.get(field) is None), None)
            if missing is not None:
                raise ValueError(f"{path}: record {missing + 1}: task {self.name!r} needs the field {field!r}")

    def configure(self) -> None:
        """Task options from the config (`data.eval.NAME: {task: ..., path: ..., OPTION: value}`)."""

    def evaluate(self, model, tok, start: dict, settings: dict) -> tuple[dict, dict]:
        """(metrics, per-example details). `start` is this task's state from the first call (the
        starting model's numbers, for metrics relative to it); `settings` the evaluator's."""
        raise NotImplementedError

    def metric_name(self, metric: str) -> str:
        return metric if self.set_name == self.name else f"{self.set_name}/{metric}"


class GenerationTask(Task):
    """A task judged on greedy completions of its prompts."""

    min_new_tokens = 0        # generate at least this many tokens (whatever the evaluator's budget)
    verdicts: tuple = ()      # the per-example judgements `judge_all` returns (evaluate.py prints them)

    def prompt(self, row: dict) -> str:
        return row["prompt"]

    def judge_all(self, texts: list[str], rows: list[dict]) -> dict[str, list]:
        """Per-example verdicts {name: [value per example]}."""
        raise NotImplementedError

    def summarise(self, verdicts: dict[str, list]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model, tok, start: dict, settings: dict) -> tuple[dict, dict]:
        from evaluation.metrics import generate_with_lengths

        prompts = [self.prompt(r) for r in self.rows]
        n = max(self.min_new_tokens, settings.get("max_new_tokens", 32))
        texts, lengths, truncated = generate_with_lengths(model, tok, prompts, n)
        details = {"prompts": prompts, "texts": texts, "lengths": lengths, "truncated": truncated}
        if self.rows and "answer" in self.rows[0]:
            details["answers"] = [str(r.get("answer")) for r in self.rows]
        verdicts = self.judge_all(texts, self.rows)
        details.update(verdicts)
        return {self.metric_name(k): v for k, v in self.summarise(verdicts).items()}, details


def rate(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / max(len(flags), 1), 4)


def build_task(set_name: str, spec, max_examples: int = 200) -> Task:
    """The task of one data.eval entry: FILE (task = set_name) or {task, path, options...}."""
    from trainer.paths import repo_path

    if isinstance(spec, str):
        return get_task(set_name)(repo_path(spec), set_name, max_examples)
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"data.eval.{set_name}: expected a file path or {{task: NAME, path: FILE, ...}}, got {spec!r}")
    from data.hf import SOURCE_KEYS  # split/subset/columns of a dataset source: data/hf.py reads them

    options = {k: v for k, v in spec.items() if k not in ("task", "path", *SOURCE_KEYS)}
    return get_task(spec.get("task", set_name))(repo_path(spec["path"]), set_name, max_examples, **options)


for _name in ("arithmetic", "multistep", "style", "harmful", "sft", "preference", "exact_match"):
    importlib.import_module(f"tasks.{_name}")
