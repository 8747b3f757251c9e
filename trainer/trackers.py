"""Experiment trackers: `logger=tensorboard|wandb|trackio|mlflow` (several: `logger=[tensorboard,mlflow]`).

metrics.jsonl and eval.json are always written and stay the source of truth; a tracker is a copy
for the dashboards people already use. So:

* **The same names and steps.** Every metrics.jsonl line goes to every tracker with its `step` and
  its numeric values under their metrics.jsonl names (`loss`, `rewards/chosen`, `clip_ratio/low`
  ...); text values (a skipped step's reason) stay in metrics.jsonl. The loop never names a
  tracker: `MetricsLog.write` (trainer/loop.py) hands each line to `log(step, metrics)`.
* **The run around the curves.** `log_config` gets the resolved config at the start (trainer/run.py);
  `log_eval` gets eval.json at the end: `eval/before/NAME`, `eval/after/NAME` and `gates/NAME`
  (1 pass, 0 fail), logged at step = the number of steps trained (after every training step, so
  each tracker's steps only grow).
* **Rank 0 only, offline by default, optional.** Trackers open on the main process only; each
  library is imported when its tracker opens (`pip install -e ".[trackers]"`), and a missing one
  is a one-line error before anything loads. wandb defaults to offline mode; trackio, MLflow and
  TensorBoard write local stores. Nothing here needs the network.
* **A tracker never stops training.** One that fails while logging prints one warning and is
  dropped; metrics.jsonl still has every line.

A new tracker is a class with `open` (classmethod), `log`, `log_config`, `log_eval`, `close`,
registered with `@register("name")`, plus its options on trainer/config.py `LoggerOptions` and a
configs/logger/NAME.yaml.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

TRACKERS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        TRACKERS[name] = cls
        cls.name = name
        return cls
    return deco


def numeric(row: dict) -> dict[str, float]:
    """The values of a metrics line a tracker can plot: finite numbers and booleans (as 0/1), not `step`."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, str) or v is None:
            continue
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def eval_metrics(results: dict) -> dict[str, float]:
    """eval.json as flat metrics: eval/before/NAME, eval/after/NAME, gates/NAME (1.0 pass, 0.0 fail)."""
    out = {}
    for when in ("before", "after"):
        for k, v in numeric(results.get(when) or {}).items():
            out[f"eval/{when}/{k}"] = v
    for k, g in (results.get("gates") or {}).items():
        out[f"gates/{k}"] = 1.0 if g.get("pass") else 0.0
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"method.lr": "1e-05", ...} (for stores that take flat string parameters)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def _need(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:  # a ValueError: train.py prints it as one line, like every config mistake
        raise ValueError(f"logger={name} needs the `{module.split('.')[0]}` package: pip install -e \".[trackers]\" "
                          f"(or pip install {name}); or choose another logger") from None


class Tracker:
    """What every tracker answers. `log_eval` logs eval.json as metrics by default."""

    name = ""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        pass

    def log_eval(self, results: dict, step: int) -> None:
        metrics = eval_metrics(results)
        if metrics:
            self.log(step, metrics)

    def close(self) -> None:
        pass


@register("tensorboard")
class TensorBoard(Tracker):
    """Event files under RUN/tensorboard, written with torch's SummaryWriter (needs `tensorboard`)."""

    @classmethod
    def open(cls, o, run_dir: str, run_name: str):
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self = cls()
        self.writer = SummaryWriter(log_dir=o.dir or os.path.join(run_dir, "tensorboard"))
        return self

    def log(self, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_config(self, config):
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log_eval(self, results, step):
        super().log_eval(results, step)
        self.writer.add_text("eval.json", "```\n" + json.dumps(results, indent=2) + "\n```", step)

    def close(self):
        self.writer.close()


@register("wandb")
class Wandb(Tracker):
    """A W&B run (offline by default: RUN/wandb/offline-run-*, uploaded later with `wandb sync`)."""

    @classmethod
    def open(cls, o, run_dir: str, run_name: str):
        wandb = _need("wandb", "wandb")
        self = cls()
        self.config = None
        self.run = wandb.init(project=o.project, name=o.name or run_name, entity=o.entity, tags=list(o.tags),
                              mode=o.mode, dir=o.dir or run_dir, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        return self

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def log_eval(self, results, step):
        super().log_eval(results, step)
        self.run.summary.update(eval_metrics(results))

    def close(self):
        self.run.finish()


@register("trackio")
class Trackio(Tracker):
    """A trackio run in its local SQLite store (TRACKIO_DIR: RUN/trackio by default)."""

    @classmethod
    def open(cls, o, run_dir: str, run_name: str):
        store = os.path.abspath(o.dir or os.path.join(run_dir, "trackio"))
        if "trackio" in sys.modules:  # trackio reads TRACKIO_DIR once, when it is imported
            import trackio.utils

            if os.path.abspath(str(trackio.utils.TRACKIO_DIR)) != store:
                raise ValueError(f"logger.trackio.dir={store}: trackio was already imported in this process with "
                                 f"TRACKIO_DIR={trackio.utils.TRACKIO_DIR}")
        os.environ["TRACKIO_DIR"] = store
        trackio = _need("trackio", "trackio")
        self = cls()
        self.project, self.run_name, self.store = o.project, o.name or run_name, store
        self.trackio, self.run, self.config = trackio, None, None
        return self

    def _start(self, config=None):  # the config is given to init, so the run starts with the first call
        if self.run is None:
            self.run = self.trackio.init(project=self.project, name=self.run_name, config=config, embed=False,
                                         auto_log_gpu=False, auto_log_cpu=False)

    def log(self, step, metrics):
        self._start()
        self.run.log(metrics, step=step)

    def log_config(self, config):
        self._start(config)

    def close(self):
        if self.run is not None:
            self.run.finish()


@register("mlflow")
class Mlflow(Tracker):
    """An MLflow run: metrics by step, the config as parameters and config.json, eval.json as an artifact."""

    @classmethod
    def open(cls, o, run_dir: str, run_name: str):
        _need("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = o.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        self = cls()
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(o.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(o.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=o.run_name or run_name,
                                             tags={"posttrain.run_dir": os.path.abspath(run_dir)}).info.run_id
        self.uri = uri
        return self

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_config(self, config):
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]  # MLflow's limit on a value
        for i in range(0, len(params), 100):  # and on parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_eval(self, results, step):
        super().log_eval(results, step)
        self.client.log_dict(self.run_id, results, "eval.json")

    def close(self):
        self.client.set_terminated(self.run_id)


class Trackers:
    """The open trackers of a run, called as one; a tracker that raises is warned about once and dropped."""

    def __init__(self, trackers: list | None = None):
        self.trackers = list(trackers or [])

    def __bool__(self):
        return bool(self.trackers)

    def _each(self, what: str, *args):
        for t in list(self.trackers):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # a dashboard must not stop training: metrics.jsonl has every line
                self.trackers.remove(t)
                text = " ".join(str(e).split())[:300]
                print(f"[posttrain] warning: logger {t.name}: {what} failed ({type(e).__name__}: {text}); "
                      "it logs nothing more, metrics.jsonl has every line", file=sys.stderr, flush=True)

    def log(self, step: int, row: dict) -> None:
        metrics = numeric(row)
        if metrics:
            self._each("log", step, metrics)

    def log_config(self, config: dict) -> None:
        self._each("log_config", config)

    def log_eval(self, results: dict, step: int) -> None:
        self._each("log_eval", results, step)

    def close(self) -> None:
        self._each("close")
        self.trackers = []


def open_trackers(options, run_dir: str, main: bool = True) -> Trackers:
    """The trackers `options` (a LoggerOptions) turns on, opened for `run_dir`; none off rank 0.

    An uninstalled library or a store that cannot be opened is an error here, before training."""
    if not main or options is None:
        return Trackers()
    name = os.path.basename(os.path.normpath(run_dir))
    opened = []
    for f in dataclasses.fields(options):
        o = getattr(options, f.name)
        if o is None:
            continue
        try:
            opened.append(TRACKERS[f.name].open(o, run_dir, name))
        except BaseException as e:
            Trackers(opened).close()
            if isinstance(e, ValueError) or not isinstance(e, Exception):
                raise
            text = " ".join(str(e).split())[:300]
            raise ValueError(f"logger={f.name}: cannot open the tracker ({type(e).__name__}: {text})") from None
    return Trackers(opened)
