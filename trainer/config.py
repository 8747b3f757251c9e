"""Typed configs: every option declared once, with its type, default, range and a line on why.

Hydra composes the YAML under configs/; this file gives that YAML types, so a misspelt key or a
wrong value is an error that names it before anything is loaded.

How a method's options reach a run:
  * Each batch kind's feed (trainer/feeds/) and each program (steering/run.py) declares its options
    as a dataclass built from `opt(...)` fields and registers it with `@register_options(kind)`.
  * `register_hydra()` stores each one as a Hydra config `_<kind>` in the `method` group, filled
    with the defaults. A method YAML starts with `defaults: [_rollouts, _self_]` (or another
    method: `defaults: [grpo, _self_]`) and then shows only what it changes; every option can be
    overridden on the command line (`method.num_generations=4`) whether the YAML mentions it or not.
  * `parse(cfg)` turns the composed config into dataclasses: unknown keys (with the nearest valid
    name), wrong types, values out of range and `loss_args` the loss function does not take are all
    one-line `ConfigError`s. The run then reads typed attributes (`cfg.method.lr`), never
    `.get("key", default)`, so there is no second, silent default anywhere.

`python -m trainer.config [KIND]` prints every option of a kind with its type, default and doc.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

REQUIRED = "???"  # Hydra's marker for a value that must be given


class ConfigError(ValueError):
    """A config key or value that cannot be used, named with its full dotted key."""


def opt(default: Any = REQUIRED, doc: str = "", *, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False):
    """A documented dataclass field; lists and dicts are copied per instance. `min`/`max` bound numbers."""
    meta = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def import_object(spec: str, default_module: str | None = None):
    """`pkg.module:name` -> the object; a bare `name` is looked up in `default_module`."""
    module, sep, name = spec.partition(":")
    if not sep:
        if default_module is None:
            raise ConfigError(f"{spec!r}: expected module:name")
        module, name = default_module, spec
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{spec!r}: cannot import {name} from {module} ({e})") from None


# ============================================================================ conversion
def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_type_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} options"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            type(None): "null", Any: "anything", dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]) and isinstance(value, Mapping):
            return build(options[0], value, where)  # name the bad key inside it, not the whole mapping
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else Any
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        item = args[1] if args else Any
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported option type {tp!r}")


def _check_range(f: dataclasses.Field, value, where: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if lo is not None and (value <= lo if f.metadata.get("min_exclusive") else value < lo):
        raise ConfigError(f"{where}: must be {'>' if f.metadata.get('min_exclusive') else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be <= {hi}, got {value}")


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def unknown_key_error(key: str, valid, where: str) -> ConfigError:
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{_join(where, key)}: unknown option{hint}; valid options: {', '.join(valid)}")


def build(cls, data: Mapping, where: str):
    """An instance of dataclass `cls` from `data`, every key, type and range checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(str(key), fields, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{_join(where, name)}: required ({f.metadata.get('doc', '')})".rstrip(" ()"))
        if value == REQUIRED:
            raise ConfigError(f"{_join(where, name)}: required, not set ({f.metadata.get('doc', '')})".rstrip(" ()"))
        values[name] = _convert(hints[name], value, _join(where, name))
        _check_range(f, values[name], _join(where, name))
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def defaults(cls) -> dict:
    """The options of `cls` with their defaults, as a plain dict (REQUIRED where there is none)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            v = REQUIRED
        out[f.name] = defaults(v) if dataclasses.is_dataclass(v) else v
    return out


# ============================================================================ the options every method has
@dataclass
class Method:
    """What every method config has: a name, the kind that runs it and its quality gates."""
    name: str = opt(REQUIRED, "run label: runs/NAME/<time> by default")
    kind: str = opt(REQUIRED, "the batch kind (a feed in trainer/feeds/) or program (steer, abliterate)")
    program: str = opt("trainer.run:train", "module:function that runs the method (training loop by default)")
    gates: dict[str, float] = opt({}, "held-out quality gates on eval.json 'after': kl* a maximum, the rest minima")
    extra_eval: dict[str, Any] = opt({}, "held-out sets added to data.eval for this method")


@dataclass
class Optim:
    """AdamW with linear warmup and cosine decay: the one place these keys and their defaults live."""
    lr: float = opt(1e-5, "peak learning rate (x lora.lr_scale with adapters)", min=0, min_exclusive=True)
    weight_decay: float = opt(0.0, "decoupled weight decay on matrices (never on norms or biases)", min=0)
    betas: list[float] = opt([0.9, 0.95], "AdamW (beta1, beta2)")
    warmup_ratio: float = opt(0.05, "share of the steps spent warming up linearly", min=0, max=1)
    min_lr_ratio: float = opt(0.1, "cosine decays to lr x min_lr_ratio (1.0: constant after warmup)", min=0, max=1)
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm", min=0, min_exclusive=True)

    def check(self, where: str) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1), got {self.betas}")


@dataclass
class Scratch:
    """method=pretrain: a fresh tokenizer and model instead of loading model.path."""
    tokenizer_vocab_size: int = opt(1024, "BPE vocabulary trained on the corpus", min=32)
    init_std: float = opt(0.02, "normal init of every matrix (residual projections / sqrt(2 layers))", min=0)
    arch: dict[str, Any] = opt({}, "config.json fields (HF names) of the new model")


@dataclass
class TrainMethod(Method, Optim):
    """A method trained by the shared loop: a loss, a batch kind, data and the optimiser."""
    loss: str = opt(REQUIRED, "losses/NAME.py NAME_loss, or module:function")
    data_format: str = opt(REQUIRED, "data/formats.py format of the training file")
    train_file: str | None = opt(None, "training file of this method (data.train overrides it)")
    loss_args: dict[str, Any] = opt({}, "keyword arguments of the loss (checked against its signature)")
    reference: bool = opt(False, "keep a frozen reference policy (a copy, or the adapters-disabled base)")
    max_steps: int | None = opt(None, "optimiser steps (null: from epochs, for dataset kinds)", min=1)
    export: str | None = opt(None, "also copy checkpoints/final to this directory (atomically)")
    scratch: Scratch | None = opt(None, "build a fresh tokenizer + model (pretraining) instead of loading one")


# ============================================================================ the other groups
@dataclass
class ModelOptions:
    """configs/model/*.yaml"""
    path: str = opt(REQUIRED, "HF model directory or hub id")
    dtype: Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = opt("auto", "weights dtype")
    gradient_checkpointing: bool = opt(False, "recompute each block in backward (less activation memory)")
    compile: bool = opt(False, "torch.compile each transformer block")


@dataclass
class DataOptions:
    """configs/data/*.yaml"""
    train: str | None = opt(None, "training file; null: data.files[method.data_format]")
    max_length: int = opt(256, "tokens per example; longer ones are truncated and counted", min=1)
    files: dict[str, str] = opt({}, "training file per data format")
    eval: dict[str, Any] = opt({}, "held-out sets: NAME: FILE (task NAME), or NAME: {task, path, split, subset, "
                                   "columns, ...}, null skips")
    split: str = opt("train", "split of a dataset source (parquet/arrow/CSV/JSON file, save_to_disk dir, hub id)")
    subset: str | None = opt(None, "config name of a hub dataset (datasets.load_dataset's second argument)")
    columns: dict[str, str] | None = opt(None, "seed-format field -> dataset column, e.g. "
                                               "{prompt: question, answer: final_answer}")
    streaming: bool = opt(False, "dataset sources: validate in batches and read rows lazily from the memory-mapped "
                                 "Arrow files instead of holding them in memory")


@dataclass
class LoraOptions:
    """configs/lora/*.yaml"""
    kind: Literal["none", "lora", "dora"] = opt("none", "none: full fine-tuning")
    rank: int = opt(16, "adapter rank r", min=1)
    alpha: float = opt(32, "scaling alpha/r (alpha/sqrt(r) with use_rslora)", min=0, min_exclusive=True)
    dropout: float = opt(0.0, "dropout on the adapter input", min=0, max=1)
    use_rslora: bool = opt(False, "rank-stabilised scaling")
    targets: list[str] | str = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "linear layer names, or all-linear")
    quantize: bool = opt(False, "NF4-quantise the frozen base (QLoRA)")
    lr_scale: float = opt(10.0, "adapters train at method.lr x lr_scale", min=0, min_exclusive=True)
    export_merged: bool = opt(False, "also write checkpoints/merged (adapter merged into a full model)")


@dataclass
class PipelineOptions:
    """configs/pipeline/*.yaml"""
    stages: list[dict[str, Any]] = opt([], "stages: {name, method, overrides, gates}; empty: no pipeline")


@dataclass
class TensorBoardOptions:
    """logger=tensorboard (configs/logger/tensorboard.yaml)"""
    dir: str | None = opt(None, "event file directory (null: RUN/tensorboard)")


@dataclass
class WandbOptions:
    """logger=wandb (configs/logger/wandb.yaml): offline unless mode=online"""
    project: str = opt("posttrain", "W&B project")
    name: str | None = opt(None, "run name (null: the run directory's name)")
    entity: str | None = opt(None, "W&B entity (team or user)")
    tags: list[str] = opt([], "run tags")
    mode: Literal["offline", "online", "disabled"] = opt("offline", "offline: written under dir, `wandb sync` uploads")
    dir: str | None = opt(None, "where wandb/ is written (null: RUN)")


@dataclass
class TrackioOptions:
    """logger=trackio (configs/logger/trackio.yaml): a local SQLite store"""
    project: str = opt("posttrain", "trackio project (one SQLite file per project)")
    name: str | None = opt(None, "run name (null: the run directory's name)")
    dir: str | None = opt(None, "TRACKIO_DIR, where the project databases live (null: RUN/trackio)")


@dataclass
class MlflowOptions:
    """logger=mlflow (configs/logger/mlflow.yaml)"""
    tracking_uri: str | None = opt(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working "
                                         "directory (MLflow's default); or any file:, sqlite:, http(s): store")
    experiment: str = opt("posttrain", "experiment name (created when missing)")
    run_name: str | None = opt(None, "run name (null: the run directory's name)")


@dataclass
class LoggerOptions:
    """configs/logger/*.yaml: the experiment trackers a run also writes to (each one present is on;
    metrics.jsonl and eval.json are always written and stay the source of truth)."""
    tensorboard: TensorBoardOptions | None = opt(None, "TensorBoard event files")
    wandb: WandbOptions | None = opt(None, "Weights & Biases (offline by default)")
    trackio: TrackioOptions | None = opt(None, "trackio (local SQLite)")
    mlflow: MlflowOptions | None = opt(None, "MLflow tracking store")


@dataclass
class RunConfig:
    """configs/config.yaml plus the chosen groups."""
    method: Any = opt(REQUIRED)
    model: ModelOptions = opt(REQUIRED)
    data: DataOptions = opt(REQUIRED)
    lora: LoraOptions = opt(REQUIRED)
    pipeline: PipelineOptions = opt(REQUIRED)
    logger: LoggerOptions = field(default_factory=LoggerOptions, metadata={
        "doc": "experiment trackers: logger=tensorboard|wandb|trackio|mlflow, or several: logger=[tensorboard,mlflow]"})
    seed: int = opt(0, "seeds data order, init and sampling")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    eval_before: bool = opt(True, "evaluate the starting model (eval.json 'before')")
    eval_after: bool = opt(True, "evaluate the trained model (eval.json 'after')")
    eval_max_examples: int = opt(200, "examples per held-out set", min=1)
    log_every: int = opt(1, "steps between metrics.jsonl lines", min=1)
    eval_every: int = opt(0, "steps between held-out evaluations logged as eval/NAME in metrics.jsonl (0: off)", min=0)
    progress: bool = opt(True, "tqdm progress bar")
    checkpoint_every: int = opt(0, "steps between crash-safe checkpoints (0: final model only)", min=0)
    keep_checkpoints: int = opt(2, "newest step checkpoints kept (0: all)", min=0)
    resume: bool | str = opt(False, "true: newest checkpoint of hydra.run.dir; DIR: of that run or checkpoint")
    skip_budget: int = opt(5, "non-finite steps skipped and reported before the run stops", min=0)
    judge: Literal["auto", "builtin", "math_verify"] = opt(
        "auto", "math answers (math_answer reward, accuracy): math_verify if installed (auto), or force one")


GROUPS = {"method": None, "model": ModelOptions, "data": DataOptions, "lora": LoraOptions,
          "pipeline": PipelineOptions, "logger": None}  # the config groups (the method group's bases are per kind, below)


# ============================================================================ method kinds
OPTIONS: dict[str, type] = {}  # kind -> its options dataclass (feeds and programs register here)


def registrar(table: dict, what: str, attr: str):
    """`register(name)`, a decorator that adds a class to `table` under a name no other class has,
    and records the name on the class as `attr` (the feeds', tasks' and kinds' registries)."""
    def register(name: str):
        def deco(cls):
            if name in table and table[name] is not cls:
                raise ValueError(f"{what} {name!r} is already registered ({table[name].__qualname__})")
            table[name] = cls
            setattr(cls, attr, name)
            return cls
        return deco
    return register


# Class decorator: the options dataclass of a batch kind or program, stored as Hydra's `_<kind>`.
register_options = registrar(OPTIONS, "options for kind", "KIND")


def _load_kinds() -> None:
    importlib.import_module("trainer.feeds")   # the batch kinds
    importlib.import_module("steering.run")    # steer, abliterate


OPEN_KEYS = ("loss_args", "gates", "extra_eval")  # keys whose sub-keys a YAML or command line may add


def register_hydra() -> None:
    """Store `_<kind>` (the defaults of every kind) in Hydra's method group. Call before composing."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    _load_kinds()
    cs = ConfigStore.instance()
    top = {k: v for k, v in defaults(RunConfig).items() if k not in GROUPS}
    cs.store(name="_run", node=top)  # configs/config.yaml starts from it
    for group, cls in GROUPS.items():  # configs/<group>/*.yaml start from `_<group>`
        if cls is not None:
            cs.store(group=group, name=f"_{group}", node=defaults(cls))
    for kind, cls in OPTIONS.items():
        node = OmegaConf.create({**defaults(cls), "kind": kind})
        for open_key in OPEN_KEYS:  # any key may be added on the command line; parse() checks them
            if open_key in node:
                OmegaConf.set_struct(node[open_key], False)
        cs.store(group="method", name=f"_{kind}", node=node)


def check_loss_args(loss: str, loss_args: dict, where: str) -> None:
    """loss_args must be keyword parameters of the loss function, with values of their annotated types."""
    from losses import resolve_loss

    try:
        fn = resolve_loss(loss)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}.loss: cannot find loss {loss!r} ({e})") from None
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    tunable = {n for n, p in params.items() if p.default is not inspect.Parameter.empty}
    for key, value in loss_args.items():
        if key not in params:
            if not tunable:
                raise ConfigError(f"{where}.loss_args.{key}: {fn.__name__} takes no options")
            raise unknown_key_error(key, tunable, f"{where}.loss_args")
        if key in hints and value is not None:
            _convert(hints[key], value, f"{where}.loss_args.{key}")


def parse(cfg) -> RunConfig:
    """The composed Hydra config as typed dataclasses, every key checked (ConfigError otherwise)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if OmegaConf.is_config(cfg) else dict(cfg)
    raw.pop("hydra", None)
    method = raw.get("method") or {}
    _load_kinds()
    kind = method.get("kind", REQUIRED)
    if kind not in OPTIONS:
        raise ConfigError(f"method.kind: {kind!r} is not a batch kind or program; known: {', '.join(sorted(OPTIONS))} "
                          "(a method YAML starts with `defaults: [_KIND, _self_]`)")
    typed_method = build(OPTIONS[kind], method, "method")
    if isinstance(typed_method, TrainMethod):
        check_loss_args(typed_method.loss, typed_method.loss_args, "method")
    run = build(RunConfig, {**raw, "method": None}, "")
    run.method = typed_method
    return run


def compose(overrides: list[str] = ()) -> RunConfig:
    """The typed config `python train.py OVERRIDES...` would run (for notebooks, tests and scripts)."""
    import os

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.paths import REPO

    register_hydra()
    if GlobalHydra.instance().is_initialized():
        return parse(hydra_compose("config", overrides=list(overrides)))
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        return parse(hydra_compose("config", overrides=list(overrides)))


def describe(kind: str) -> str:
    """Every option of a kind: name, type, default and doc (one line each)."""
    _load_kinds()
    cls = OPTIONS[kind]
    hints = typing.get_type_hints(cls)
    lines = [f"{kind}: {cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__}"]
    for f in dataclasses.fields(cls):
        d = defaults(cls)[f.name]
        lines.append(f"  {f.name:<28} {_type_name(hints[f.name]):<32} {d!r:<24} {f.metadata.get('doc', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    _load_kinds()
    for k in (sys.argv[1:] or sorted(OPTIONS)):
        print(describe(k) + "\n")
