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
