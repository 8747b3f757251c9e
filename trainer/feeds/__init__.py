"""Feeds: the training loop's only view of a batch kind.

A method is a loss plus a config; the config names the loss and its batch kind, and the kind is a
feed. The loop (trainer/loop.py) asks the feed for everything kind-specific and never tests a kind
or a loss type by name:

    feed.load(model, run_dir)         read and validate the training data (before any step runs)
    feed.setup_model(model)           model changes the kind needs (a reward model's score head)
    feed.use_reference(ref) -> ref    e.g. store the reference log-probs once and free the copy
    feed.evaluator(default)           the held-out evaluation, or the kind's own (reward models)
    feed.total_steps                  optimiser steps of the run
    feed.next_step(model) -> Step     this step's micro-batches, the weight of each, step metrics
    feed.loss_inputs(model, ref, mb)  the loss's keyword inputs for one micro-batch
    feed.describe(mb), feed.memory_hints()   what an out-of-memory report says
    feed.state_dict() / load_state_dict()    the data position a checkpoint stores

Built-in kinds (one file each):
    tokens        one sequence per example (SFT, pretraining)          feeds/tokens.py
    pairs         prompt + chosen + rejected (DPO, ORPO, CPO, SimPO)    feeds/pairs.py
    reward_pairs  prompt + chosen + rejected for a reward model          feeds/reward_pairs.py
    unpaired      prompt + completion + label (KTO)                     feeds/unpaired.py
    rollouts      prompts sampled on-line, group advantages (GRPO ...)  feeds/rollouts.py
    nash_md       policy samples against mixture samples (Nash-MD)      feeds/nash_md.py
    distill       student samples scored by a frozen teacher (OPD, GKD) feeds/distill.py
A new kind is one file here: an options dataclass registered with `@register_options(KIND)` and
a Feed subclass registered with `@register_feed(KIND)`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch

from losses import resolve_loss
from trainer.config import ConfigError, TrainMethod, opt, registrar

FEEDS: dict[str, type] = {}


register_feed = registrar(FEEDS, "a feed for kind", "kind")  # class decorator: the Feed of a batch kind


def get_feed(kind: str) -> type:
    if kind not in FEEDS:
        raise ConfigError(f"method.kind: no feed for kind {kind!r}; known kinds: {', '.join(sorted(FEEDS))}")
    return FEEDS[kind]


@dataclass
class Step:
    """One optimiser step's work: micro-batches, the factor on each one's loss, and step metrics.

    The weights make the accumulated gradient the step's gradient: 1/k for k equal micro-batches,
    each micro-batch's share of the rows or tokens when they differ, 1 when the loss is already
    normalised by the whole batch.
    """
    micro_batches: list
    weights: list[float]
    metrics: dict = field(default_factory=dict)
    indices: list | None = None  # example indices per micro-batch (dataset kinds), for error reports


class Feed:
    """Base class: what every feed answers; subclasses fill in the kind-specific parts."""

    kind = ""
    progress_metrics: tuple = ()  # step metrics the progress bar shows beside loss and tokens/s

    def __init__(self, cfg, tok, device, rank: int = 0, world: int = 1):
        self.cfg, self.m, self.tok, self.device = cfg, cfg.method, tok, device
        self.rank, self.world = rank, world
        self.loss_fn = resolve_loss(self.m.loss)

    # ------------------------------------------------------------------ before training
    def load(self, model, run_dir: str) -> None:
        raise NotImplementedError

    def setup_model(self, model) -> None:
        """Model changes this kind needs before training (none by default)."""

    def use_reference(self, ref):
        """The reference the loss inputs will use (the given one by default)."""
        return ref

    def evaluator(self, default):
        """The held-out evaluation of this kind's runs (the shared one by default)."""
        return default

    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ every step
    def next_step(self, model) -> Step:
        raise NotImplementedError

    def loss_inputs(self, model, ref, micro) -> tuple[dict, int, dict]:
        """(loss keyword inputs, real tokens run, extra metrics) for one micro-batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reports and resume
    def describe(self, micro) -> str:
        return f"{len(micro)} rows"

    def memory_hints(self) -> list[str]:
        return []

    def state_dict(self) -> dict:
        raise NotImplementedError(f"the {self.kind} feed cannot save its data position")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"the {self.kind} feed cannot restore its data position")


# ============================================================================ dataset kinds
@dataclass
class DatasetMethod(TrainMethod):
    """Methods on a fixed training file: batches of examples, epochs."""
    batch_size: int = opt(8, "examples per micro-batch and process", min=1)
    grad_accum: int = opt(1, "micro-batches per optimiser step and process", min=1)
    epochs: int = opt(1, "passes over the data when max_steps is null", min=1)


class DatasetFeed(Feed):
    """Offline kinds: `grad_accum` micro-batches of `batch_size` examples per step and process,
    reshuffled (seeded) every epoch.

    Under torchrun every rank draws the same global step (grad_accum x world micro-batches) from the
    same generator and keeps micro-batches rank, rank + world, ...: N processes see exactly what one
    process with grad_accum x N sees.
    """

    def __init__(self, cfg, tok, device, rank: int = 0, world: int = 1):
        super().__init__(cfg, tok, device, rank, world)
        self.examples: list = []
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order, self.cursor = [], 0

    def training_file(self) -> str:
        from trainer.paths import repo_path

        path = self.cfg.data.train or self.m.train_file or self.cfg.data.files.get(self.m.data_format)
        if path is None:
            raise ConfigError(f"no training file: set data.train=FILE (format {self.m.data_format!r})")
        return repo_path(path)

    @property
    def total_steps(self) -> int:
        if self.m.max_steps is not None:
            return self.m.max_steps
        per_step = self.m.batch_size * self.m.grad_accum * self.world
        return math.ceil(len(self.examples) / per_step) * self.m.epochs

    def next_step(self, model) -> Step:
        picked = []
        for _ in range(self.m.grad_accum * self.world):
            if self.cursor + self.m.batch_size > len(self.order):
                self.order, self.cursor = torch.randperm(len(self.examples), generator=self.gen).tolist(), 0
            picked.append(self.order[self.cursor:self.cursor + self.m.batch_size])
            self.cursor += self.m.batch_size
        mine = picked[self.rank::self.world]
        return Step([[self.examples[i] for i in idx] for idx in mine], [1.0 / len(mine)] * len(mine), {}, mine)

    def describe(self, micro) -> str:
        lengths = [len(s["input_ids"]) for ex in micro for s in self.sequences(ex)]
        return f"{len(lengths)} sequences x {max(lengths, default=0)} tokens"

    def sequences(self, example) -> list[dict]:
        """The tokenized sequences of one example (for reports)."""
        return [example]

    def memory_hints(self) -> list[str]:
        m = self.m
        return [f"method.batch_size={max(1, m.batch_size // 2)} method.grad_accum={2 * m.grad_accum} "
                "(same global batch, half the activations)"]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.cursor = list(state["order"]), state["cursor"]


for _name in ("tokens", "pairs", "reward_pairs", "unpaired", "rollouts", "nash_md", "distill"):
    importlib.import_module(f"trainer.feeds.{_name}")
