"""Turn `model.path` into a local directory: a directory as it is, or a hub id through huggingface_hub.

The rule, in order:
  1. an existing directory (absolute, or relative to the working directory) is used as it is;
  2. a relative path that names a directory under the repository root is that directory (so
     `assets/tiny-qwen3` works from any working directory);
  3. anything of the form `org/name` is a hub id;
  4. otherwise it is an error that names the path.
A path that is the repository root joined onto a hub id (`<repo>/Qwen/Qwen3-0.6B`, what a caller
that prefixes the root to every relative path produces) is read as the hub id: such a directory does
not exist, and the id is what was meant.

Only what a causal LM needs is fetched (safetensors, json, tokenizer and template files; never
`.bin`, `.pt`, `.h5`, ONNX or GGUF blobs). Offline mode (`HF_HUB_OFFLINE=1`) is honoured by
huggingface_hub itself: the snapshot comes from the local cache or not at all. Every failure says
what was looked for and where.
"""
from __future__ import annotations

import os
import re

from model.config import MissingModelFile

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja", "*.txt"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """`org/name` as the hub spells repository ids (no `..`, no leading `.` or `/`)."""
    return bool(HUB_ID.fullmatch(path)) and ".." not in path and not path.endswith(".")


def local_or_hub(path_or_id: str) -> tuple[str | None, str | None]:
    """(directory, None) for a local model directory, (None, hub id) for a hub id, by the module's rule."""
    path = os.path.expanduser(str(path_or_id))
    if os.path.isdir(path):
        return path, None
    if not os.path.isabs(path):
        in_repo = os.path.join(REPO, path)
        if os.path.isdir(in_repo):
            return in_repo, None
    elif path.startswith(REPO + os.sep) and is_hub_id(path[len(REPO) + 1:]):
        return None, path[len(REPO) + 1:]
    if is_hub_id(path):
        return None, path
    raise MissingModelFile(f"model '{path_or_id}': no such directory (looked in the working directory and in "
                           f"{REPO}), and not a hub id of the form 'org/name'")


def resolve_model_dir(path_or_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    directory, repo_id = local_or_hub(path_or_id)
    if directory is not None:
        return directory
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("loading a hub id needs huggingface_hub (pip install huggingface-hub)") from e
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        raise MissingModelFile(
            f"model '{repo_id}': not a local directory, and not found in the hub cache ({where}) "
            f"with files {ALLOW_PATTERNS}; offline mode is {'on' if constants.HF_HUB_OFFLINE else 'off'} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    except HfHubHTTPError as e:
        raise MissingModelFile(f"model '{repo_id}': the hub refused it "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
