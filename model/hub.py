"""Turn `model.path` into a local directory: a directory as it is, or a hub id through huggingface_hub.

Only what a causal LM needs is fetched (safetensors, json, tokenizer and template files; never
`.bin`, `.pt`, `.h5`, ONNX or GGUF blobs). Offline mode (`HF_HUB_OFFLINE=1`) is honoured by
huggingface_hub itself: the snapshot comes from the local cache or not at all. Every failure says
what was looked for and where.
"""
from __future__ import annotations

import os

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja", "*.txt"]


def resolve_model_dir(path_or_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    path = os.path.expanduser(str(path_or_id))
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model '{path_or_id}': no such directory, and not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("loading a hub id needs huggingface_hub (pip install huggingface-hub)") from e
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"model '{path_or_id}': not a local directory, and not found in the hub cache ({where}) "
            f"with files {ALLOW_PATTERNS}; offline mode is {'on' if constants.HF_HUB_OFFLINE else 'off'} ({e})"
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"model '{path_or_id}': the hub refused it ({e})") from None
