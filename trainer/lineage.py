"""Run lineage and model cards: which code, config, model and data made a checkpoint.

    RUN/lineage.json                written before training starts (trainer/run.py `setup`):
        code        git commit of the tree and whether it had uncommitted changes
        config      the resolved, typed config (every default filled in)
        command     the command line that reproduces the run
        base_model  model.path as given, the directory it resolved to, the hub id and snapshot
                    revision when it came from the hub cache, the sha256 of each safetensors file
        data        every data file the config names (training file, held-out sets, method files):
                    role, path, sha256, rows (dataset sources: split, subset, columns too)
        libraries   versions of torch, safetensors, tokenizers, ... (and the optional ones present)
        machine     device, its name, world size, CPU model, cores, platform
        parent      the run this one continues: the checkpoint it resumed from, or the run whose
                    checkpoints/final is this run's model.path (a pipeline's previous stage)
        pipeline    the pipeline directory and stage, for a pipeline stage
    RUN/checkpoints/final/README.md a model card the hub renders: YAML front matter (base_model when
                    it is a hub id, library_name, tags, datasets, pipeline_tag) and the method, base,
                    data, the eval.json figures and the command that reproduces it. trainer/run.py writes
                    it after the final model and just before eval.json, in the same final step.

Hashing a 100 GB model would take minutes: files in the hub cache are stored under their sha256
(`blobs/<sha256>`), so a snapshot's safetensors are named by their symlink target, not re-read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys

from trainer.paths import REPO, repo_path

LIBRARIES = ("torch", "safetensors", "tokenizers", "huggingface-hub", "numpy", "hydra-core", "omegaconf", "triton",
             "jinja2", "datasets", "math-verify", "tensorboard", "wandb", "trackio", "mlflow", "posttrain")
DATA_SUFFIXES = (".jsonl", ".parquet", ".arrow", ".csv", ".tsv", ".json")
PIPELINE_ENV = "POSTTRAIN_PIPELINE"   # set by trainer/pipeline.py for each stage: "DIR\tSTAGE"
_HEX = set("0123456789abcdef")


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def sha256(path: str) -> str:
    """sha256 of a file; a hub-cache symlink to blobs/<sha256> is named by its target without reading it."""
    target = os.path.realpath(path)
    name = os.path.basename(target)
    if os.path.islink(path) and os.path.basename(os.path.dirname(target)) == "blobs" and len(name) == 64 \
            and set(name) <= _HEX:
        return name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_state(root: str = REPO) -> dict:
    """{commit, dirty} of the tree the code runs from; nulls outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def libraries() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None) -> dict:
    import torch

    from trainer import distributed

    dev = str(device) if device is not None else "cpu"
    name = torch.cuda.get_device_name(device) if dev.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": dev, "device_name": name, "world_size": distributed.world_size(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def base_model(path: str | None, scratch: bool = False) -> dict:
    """model.path: as given, the directory it is, hub id + revision for a hub snapshot, safetensors sha256."""
    if scratch:
        return {"path": None, "scratch": True}
    from model.hub import local_or_hub

    info = {"path": path, "dir": None, "hub_id": None, "revision": None, "safetensors": {}}
    try:
        directory, hub_id = local_or_hub(path)
        if directory is None:  # a hub id: the snapshot the loader used, from the local cache only
            from huggingface_hub import snapshot_download

            directory = snapshot_download(hub_id, local_files_only=True, allow_patterns=["*.json"])
    except Exception:  # lineage records what it can; the loader itself reports a missing model
        return info
    directory = os.path.abspath(directory)
    parts = directory.split(os.sep)
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):  # .../models--org--name/snapshots/REV
        i = parts.index("snapshots")
        info["revision"] = parts[i + 1]
        if parts[i - 1].startswith("models--"):
            hub_id = parts[i - 1][len("models--"):].replace("--", "/")
    info["dir"], info["hub_id"] = directory, hub_id
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            info["safetensors"][name] = sha256(os.path.join(directory, name))
    card = os.path.join(directory, "README.md")  # a posttrain model card names the hub model it started from
    if hub_id is None and os.path.exists(card):
        info["card_base_model"] = _front_matter(card).get("base_model")
    return info


def _front_matter(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.startswith("---\n"):
            return yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
    except (OSError, ValueError, yaml.YAMLError):
        pass
    return {}


def _data_files(cfg) -> list[tuple[str, str, dict]]:
    """(role, path, dataset options) of every data file the config names."""
    from evaluation.metrics import held_out_sets

    out, m = [], cfg.method
    fmt = getattr(m, "data_format", None)
    train = cfg.data.train or getattr(m, "train_file", None) or (cfg.data.files.get(fmt) if fmt else None)
    if train:
        out.append(("train", train, {}))
    for name, spec in held_out_sets(cfg).items():
        if isinstance(spec, str):
            out.append((f"eval/{name}", spec, {}))
        elif isinstance(spec, dict) and "path" in spec:
            own = {k: spec[k] for k in ("split", "subset", "columns") if k in spec}
            out.append((f"eval/{name}", spec["path"], own))
    seen = {repo_path(p) for _, p, _ in out}
    for key, value in config_dict(m).items():  # method files: on-policy prompts, steering prompt sets ...
        if isinstance(value, str) and value.endswith(DATA_SUFFIXES) and repo_path(value) not in seen:
            out.append((f"method.{key}", value, {}))
            seen.add(repo_path(value))
    return out


def data_info(cfg) -> list[dict]:
    from data import hf

    rows = []
    for role, given, opts in _data_files(cfg):
        path = repo_path(given)
        entry = {"role": role, "path": given, "resolved": os.path.abspath(path) if os.path.exists(path) else None}
        if hf.is_dataset_source(path):
            o = {"split": cfg.data.split, "subset": cfg.data.subset, "columns": cfg.data.columns, **opts}
            entry.update({"split": o["split"], "subset": o["subset"], "columns": o["columns"] or {}})
            entry["rows"] = hf.row_count(path, o["split"], o["subset"])
            if not os.path.exists(path):
                entry["hub_id"] = given
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                entry["rows"] = sum(1 for line in f if line.strip())
        if os.path.isfile(path):
            entry["sha256"] = sha256(path)
        elif os.path.isdir(path):  # a save_to_disk directory: one digest over its files, in name order
            h = hashlib.sha256()
            for name in sorted(os.listdir(path)):
                if os.path.isfile(os.path.join(path, name)):
                    h.update(name.encode() + b"\0" + sha256(os.path.join(path, name)).encode())
            entry["sha256"] = h.hexdigest()
        rows.append(entry)
    return rows


def command() -> str:
    """The command that reproduces this run: train.py with the same overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # composed in a notebook or test: the process's own arguments
        overrides = sys.argv[1:] if os.path.basename(sys.argv[0]) == "train.py" else []
    return " ".join(["python", "train.py", *map(shlex.quote, overrides)])


def parent(cfg, run_dir: str) -> dict | None:
    """The run this one continues: a resumed checkpoint, or the run whose final model it starts from."""
    from trainer import checkpoint

    if cfg.resume not in (False, "false", None):
        where = run_dir if cfg.resume in (True, "true") else repo_path(str(cfg.resume))
        ckpt = checkpoint.latest(where)
        if ckpt is not None:
            return {"kind": "resume", "checkpoint": os.path.abspath(ckpt),
                    "run_dir": os.path.abspath(os.path.dirname(os.path.dirname(ckpt)))}
    path = repo_path(cfg.model.path)
    if path and os.path.isdir(path):
        up = os.path.dirname(os.path.abspath(path))
        if os.path.basename(up) == "checkpoints" and os.path.exists(os.path.join(os.path.dirname(up), "lineage.json")):
            return {"kind": "model", "checkpoint": os.path.abspath(path), "run_dir": os.path.dirname(up)}
    return None


def build(cfg, run_dir: str, device=None) -> dict:
    from tasks.arithmetic import active_judge

    pipeline = os.environ.get(PIPELINE_ENV)
    record = {
        "run_dir": os.path.abspath(run_dir),
        "code": git_state(),
        "command": command(),
        "config": config_dict(cfg),
        "base_model": base_model(cfg.model.path, scratch=getattr(cfg.method, "scratch", None) is not None),
        "data": data_info(cfg),
        "libraries": libraries(),
        "machine": machine(device),
        "judge": active_judge(),  # the math judge actually used (judge=auto resolves by what is installed)
        "parent": parent(cfg, run_dir),
    }
    if pipeline:
        directory, _, stage = pipeline.partition("\t")
        record["pipeline"] = {"dir": directory, "stage": stage}
    return record


def write(cfg, run_dir: str, device=None) -> dict:
    """RUN/lineage.json (atomically), before anything trains; returns the record."""
    record = build(cfg, run_dir, device)
    _write_json(os.path.join(run_dir, "lineage.json"), record)
    return record


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def write_pipeline(run_dir: str, report: dict, start_model: str) -> None:
    """DIR/lineage.json of a pipeline: code, machine, libraries, and each stage with its parent."""
    stages, prev = [], None
    for s in report.get("stages", []):
        stages.append({"name": s["name"], "dir": s["dir"], "parent": prev, "returncode": s.get("returncode")})
        prev = s["dir"]
    _write_json(os.path.join(run_dir, "lineage.json"), {
        "run_dir": os.path.abspath(run_dir), "kind": "pipeline", "code": git_state(), "command": command(),
        "start_model": start_model, "stages": stages, "result": report.get("result"),
        "libraries": libraries(), "machine": machine()})


# ============================================================================ model card
def _table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(final_dir: str, lineage: dict, results: dict) -> str:
    """The README.md text of checkpoints/final: YAML front matter the hub reads, then the run."""
    import yaml

    cfg = lineage["config"]
    method = cfg["method"]["name"]
    base = lineage["base_model"]
    hub_base = base.get("hub_id") or base.get("card_base_model")
    adapter = os.path.exists(os.path.join(final_dir, "adapter_config.json"))
    classifier = False
    try:
        with open(os.path.join(final_dir, "config.json"), encoding="utf-8") as f:
            classifier = any(a.endswith("ForSequenceClassification") for a in json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        pass
    meta = {}
    if hub_base:
        meta["base_model"] = hub_base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    meta["tags"] = ["posttrain", method] + ([cfg["lora"]["kind"]] if adapter else [])
    hub_data = [d["hub_id"] for d in lineage["data"] if d.get("hub_id")]
    if hub_data:
        meta["datasets"] = sorted(set(hub_data))
    before, after = results.get("before") or {}, results.get("after") or {}
    names = list(dict.fromkeys([*before, *after]))
    figures = _table([[n, before.get(n), after.get(n)] for n in names], ["metric", "before", "after"]) \
        if names else "No held-out evaluation was run."
    gates = results.get("gates") or {}
    gate_text = "".join(f"\n- gate `{k}`: {g['value']} ({'<=' if 'max' in g else '>='} {g['threshold']}) "
                        f"{'PASS' if g['pass'] else 'FAIL'}" for k, g in gates.items())
    gate_text = "\n" + gate_text if gate_text else ""
    data = _table([[d["role"], f"`{d['path']}`", d.get("rows"), (d.get("sha256") or "")[:16]] for d in lineage["data"]],
                  ["role", "file", "rows", "sha256 (first 16)"])
    base_text = f"`{base.get('path')}`" if not base.get("scratch") else "a fresh model built from scratch"
    if base.get("revision"):
        base_text += f" (hub `{base['hub_id']}` revision `{base['revision']}`)"
    code = lineage["code"]
    parent = lineage.get("parent")
    m = cfg["method"]
    length = f"{m['max_steps']} steps" if m.get("max_steps") else f"{m.get('epochs', 1)} epoch(s)"
    weights = f"a PEFT {cfg['lora']['kind']} adapter" if adapter else "full weights"
    body = f"""# {method} model trained with posttrain

**Method:** `{method}` (loss `{m.get('loss', m.get('kind'))}`, {length}), {weights}\
{', a sequence classifier' if classifier else ''}.

**Base model:** {base_text}.{f" Continues run `{parent['run_dir']}` ({parent['kind']})." if parent else ""}

## Data

{data}

## Evaluation (eval.json)

{figures}{gate_text}

## Reproduce

```bash
{lineage['command']}
```

Code: git `{code.get('commit')}`{' (uncommitted changes)' if code.get('dirty') else ''}. The full record (config, \
file hashes, library versions, machine) is `lineage.json` in the run directory.
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def write_model_card(final_dir: str, lineage: dict, results: dict) -> str:
    path = os.path.join(final_dir, "README.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(model_card(final_dir, lineage, results))
    os.replace(tmp, path)
    return path
