"""Shared pytest fixtures."""
import os
import random

# Tiny models on 2 cores: one thread avoids OpenMP oversubscription (also in train.py subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A tokenizer trained with model.train_tokenizer on 500 synthetic pretrain texts (fast, deterministic)."""
    from data.synthetic import make_pretrain
    from model.train_tokenizer import train_tokenizer

    texts = [r["text"] for r in make_pretrain(random.Random(0), 500)]
    return train_tokenizer(texts, vocab_size=1024)


def make_feed(overrides, tok, model=None, n_rows=None, run_dir=None):
    """The feed `python train.py OVERRIDES` would build, loaded, optionally cut to its first n_rows."""
    import tempfile

    from trainer.config import compose
    from trainer.feeds import get_feed

    cfg = compose(list(overrides))
    feed = get_feed(cfg.method.kind)(cfg, tok, torch.device("cpu"))
    feed.load(model, str(run_dir or tempfile.mkdtemp()))
    if n_rows is not None:
        if hasattr(feed, "rows"):
            feed.rows, feed.prompt_ids = feed.rows[:n_rows], feed.prompt_ids[:n_rows]
        else:
            feed.examples = feed.examples[:n_rows]
    return feed


@pytest.fixture(scope="module")
def tiny():
    """The embedded model and its tokenizer (fp32, CPU), loaded once per test module."""
    from model.load import load_model
    from trainer.paths import REPO

    return load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu")
