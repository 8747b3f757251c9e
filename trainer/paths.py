"""Where relative paths in configs point: the one rule every command uses.

A path that exists as given (absolute, or relative to the working directory) is used as given.
Otherwise it is tried against the repository root, so `python train.py` works from any directory
with the shipped configs' `data/synthetic/...` and `assets/...` paths. A path that exists in
neither place is returned unchanged: it may be a hub id (`Qwen/Qwen3-0.6B`), and the loader that
reads it says what it looked for.
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(path: str | None) -> str | None:
    """`path` as given if it exists (or is absolute, or None); else REPO/path if that exists; else as given."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    joined = os.path.join(REPO, path)
    return joined if os.path.exists(joined) else path
