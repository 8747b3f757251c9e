"""Experiment trackers (trainer/trackers.py): every metrics.jsonl line reaches each tracker with the same
names and steps, plus the resolved config and eval.json; read back with each library's own reader.

One short SFT run writes to all four trackers at once (offline: wandb offline mode, trackio's local
SQLite, MLflow's local file store, TensorBoard event files); each tracker's test skips, naming the
package, only when that package is not installed."""
import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from trainer.trackers import Trackers, eval_metrics, numeric, open_trackers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("tensorboard", "wandb", "trackio", "mlflow")
INSTALLED = [n for n in ALL if importlib.util.find_spec(n) is not None]


class Recorder:
    name = "recorder"

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def log(self, step, metrics):
        if self.fail_on == "log":
            raise RuntimeError("store went away\nsecond line")
        self.calls.append((step, metrics))

    def log_config(self, config):
        self.calls.append(("config", config))

    def log_eval(self, results, step):
        self.calls.append(("eval", step, eval_metrics(results)))

    def close(self):
        self.calls.append("closed")


def test_metrics_log_hands_every_line_to_the_trackers_with_its_step(tmp_path):
    from trainer.loop import MetricsLog

    rec = Recorder()
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), trackers=Trackers([rec]))
    log.write(step=0, loss=2.5, lr=1e-5, **{"rewards/chosen": 0.25})
    log.write(step=1, skipped=1, skip_reason="step 1: non-finite loss")
    log.close()
    assert rec.calls == [(0, {"loss": 2.5, "lr": 1e-5, "rewards/chosen": 0.25}), (1, {"skipped": 1.0})]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_failing_tracker_warns_once_and_is_dropped(capsys):
    bad, good = Recorder(fail_on="log"), Recorder()
    t = Trackers([bad, good])
    t.log(0, {"step": 0, "loss": 1.0})
    t.log(1, {"step": 1, "loss": 0.5})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logger recorder: log failed (RuntimeError: store went away second line)" in err[0]
    assert good.calls == [(0, {"loss": 1.0}), (1, {"loss": 0.5})] and t.trackers == [good]


def test_no_logger_opens_nothing_and_other_ranks_open_nothing(tmp_path):
    from trainer.config import compose

    assert not open_trackers(compose(["method=sft"]).logger, str(tmp_path))
    assert not open_trackers(compose(["method=sft", "logger=[tensorboard,mlflow]"]).logger, str(tmp_path), main=False)
    assert numeric({"step": 3, "loss": float("nan"), "ok": True, "n": 2, "why": "x"}) == {"ok": 1.0, "n": 2.0}


def test_an_uninstalled_tracker_is_a_one_line_error_before_training(tmp_path, monkeypatch):
    from trainer.config import compose

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ValueError, match=r'^logger=wandb needs the `wandb` package: pip install -e "\.\[trackers\]"'):
        open_trackers(compose(["method=sft", "logger=wandb"]).logger, str(tmp_path))


def test_logger_options_are_typed():
    from trainer.config import ConfigError, compose

    cfg = compose(["method=sft", "logger=[tensorboard,wandb]", "logger.wandb.project=p"])
    assert cfg.logger.wandb.project == "p" and cfg.logger.wandb.mode == "offline" and cfg.logger.mlflow is None
    with pytest.raises(ConfigError, match="logger.wandb.mode: expected one of 'offline', 'online', 'disabled'"):
        compose(["method=sft", "logger=wandb", "logger.wandb.mode=cloud"])


# ----------------------------------------------------------------------------- one run, four trackers
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    if not INSTALLED:
        pytest.skip("no tracker package installed (pip install -e \".[trackers]\")")
    tmp = tmp_path_factory.mktemp("tracked")
    run_dir = tmp / "run"
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", "progress=false",
           "eval_max_examples=4", "method=sft", "method.max_steps=3", "method.batch_size=2",
           "data.eval.style=null", "data.eval.harmful=null", "data.eval.preference=null",
           "+method.gates.accuracy=0.0", f"logger=[{','.join(INSTALLED)}]"]
    if "mlflow" in INSTALLED:  # the file store: MLflow's sqlite default spends ~15 s creating tables
        cmd.append(f"logger.mlflow.tracking_uri=file:{run_dir / 'mlruns'}")
    out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {(r["step"], k): v for r in lines for k, v in numeric(r).items()}
    results = json.loads((run_dir / "eval.json").read_text())
    final = {(3, k): v for k, v in eval_metrics(results).items()}  # eval.json at step = steps trained
    config = json.loads((run_dir / "lineage.json").read_text())["config"]
    return run_dir, expected, final, config


def need(name):
    if name not in INSTALLED:
        pytest.skip(f"the `{name}` package is not installed (pip install -e \".[trackers]\")")


def test_tensorboard_event_files_hold_the_metrics_jsonl_values(tracked_run):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, expected, final, _ = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert got.keys() == {**expected, **final}.keys()
    for key, v in {**expected, **final}.items():
        assert got[key] == pytest.approx(v, rel=1e-6), key
    assert {"config", "eval.json"} <= {t.split("/")[0] for t in acc.Tags()["tensors"]}


def wandb_records(path):
    """The records of a .wandb file: wandb's own protobuf Record, framed as the LevelDB log format its
    Go core writes (wandb 0.2x no longer ships a Python reader of the file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_metrics_config_and_eval(tracked_run):
    need("wandb")
    run_dir, expected, final, config = tracked_run
    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    got, summary, logged_config = {}, {}, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            step = row.pop("_step")
            got.update({(step, k): v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
        elif kind in ("config", "run"):
            items = r.config.update if kind == "config" else r.run.config.update
            logged_config.update({i.key: json.loads(i.value_json) for i in items})
    assert got.keys() == {**expected, **final}.keys()
    for key, v in {**expected, **final}.items():
        assert got[key] == pytest.approx(v, rel=1e-6), key
    assert summary["eval/after/accuracy"] == final[(3, "eval/after/accuracy")]
    assert logged_config["method"]["lr"] == config["method"]["lr"]


def test_trackio_store_holds_the_metrics_and_config(tracked_run, monkeypatch):
    need("trackio")
    import pathlib

    import trackio.sqlite_storage as storage

    run_dir, expected, final, config = tracked_run
    monkeypatch.setattr(storage, "TRACKIO_DIR", pathlib.Path(run_dir / "trackio"))
    logs = storage.SQLiteStorage.get_logs("posttrain", "run")
    got = {(row["step"], k): v for row in logs for k, v in row.items() if k not in ("step", "timestamp")}
    assert got.keys() == {**expected, **final}.keys()
    for key, v in {**expected, **final}.items():
        assert got[key] == pytest.approx(v, rel=1e-6), key
    assert storage.SQLiteStorage.get_run_config("posttrain", "run")["method"]["lr"] == config["method"]["lr"]


def test_mlflow_store_holds_the_metrics_params_and_eval(tracked_run, monkeypatch):
    need("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run_dir, expected, final, config = tracked_run
    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("posttrain").experiment_id])
    got = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    assert got.keys() == {**expected, **final}.keys()
    for key, v in {**expected, **final}.items():
        assert got[key] == pytest.approx(v, rel=1e-6), key
    assert run.data.params["method.lr"] == json.dumps(config["method"]["lr"])
    assert run.data.tags["posttrain.run_dir"] == str(run_dir)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
