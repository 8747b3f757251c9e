"""A staged pipeline gated by evaluation: `python train.py pipeline=sft_grpo_dpo`.

Each stage is an ordinary `train.py` run in its own sub-directory of the pipeline's run directory,
started from the previous stage's `checkpoints/final` (the first from `model.path`). After a stage,
its eval.json "after" metrics are checked against the stage's gates (evaluation/metrics.py check_gates: `kl` is a
maximum, every other metric a minimum). A failed gate stops the pipeline with a report of the metric
that missed, and the result (`DIR/final`, `DIR/pipeline.json`) is the last model that passed. Stages
run as subprocesses so each gets a fresh process, exactly as if run by hand. Each stage's
lineage.json names the pipeline and, as its parent, the previous stage's run (whose final model it
starts from); DIR/lineage.json lists the stages with their parents.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from evaluation.metrics import check_gates, gate_line
from trainer import lineage
from trainer.paths import REPO, repo_path


def run_pipeline(stages: list[dict], start_model: str, run_dir: str, common: list[str]) -> dict:
    """Run `stages` in order; returns the report written to run_dir/pipeline.json."""
    start_model = repo_path(start_model)
    report = {"stages": [], "passed": True, "result": start_model}
    model = start_model
    for i, stage in enumerate(stages):
        name = stage.get("name", stage["method"])
        stage_dir = os.path.join(run_dir, f"{i + 1}_{name}")
        cmd = [sys.executable, os.path.join(REPO, "train.py"), f"method={stage['method']}", f"model.path={model}",
               f"hydra.run.dir={stage_dir}", *common, *stage.get("overrides", [])]
        print(f"[pipeline] stage {i + 1}/{len(stages)} {name}: {' '.join(cmd[2:])}", flush=True)
        env = {**os.environ, lineage.PIPELINE_ENV: f"{os.path.abspath(run_dir)}\t{name}"}  # the stage's lineage.json
        proc = subprocess.run(cmd, cwd=os.getcwd(), env=env)  # names its pipeline; its parent is `model`'s run
        entry = {"name": name, "dir": stage_dir, "returncode": proc.returncode}
        report["stages"].append(entry)
        if proc.returncode != 0:
            entry["error"] = f"train.py exited with {proc.returncode}"
            report["passed"] = False
            break
        with open(os.path.join(stage_dir, "eval.json"), encoding="utf-8") as f:
            entry["eval"] = json.load(f)
        entry["gates"] = check_gates(entry["eval"].get("after", {}), dict(stage.get("gates") or {}))
        failed = {k: g for k, g in entry["gates"].items() if not g["pass"]}
        for k, g in entry["gates"].items():
            print(f"[pipeline]   {gate_line(k, g)}", flush=True)
        if failed:
            report["passed"] = False
            report["stopped_at"] = name
            report["missed"] = failed
            print(f"[pipeline] stopped at stage '{name}': {', '.join(failed)} missed; "
                  f"keeping {model} as the result", flush=True)
            break
        model = os.path.join(stage_dir, "checkpoints", "final")
        report["result"] = model
    final = os.path.join(run_dir, "final")
    if report["result"] != start_model and os.path.isdir(report["result"]):
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(report["result"], final)
        report["final"] = final
    with open(os.path.join(run_dir, "pipeline.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    lineage.write_pipeline(run_dir, report, start_model)  # each stage with its parent stage
    print(f"[pipeline] {'all gates passed' if report['passed'] else 'FAILED'}; result: {report['result']}", flush=True)
    return report
