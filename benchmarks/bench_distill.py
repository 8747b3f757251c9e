"""On-policy distillation against GRPO, side by side in one run: steps and wall time to accuracy.

    python benchmarks/bench_distill.py [--seeds 0 1 2] [--eval-every 5] [--max-steps 80] [--out DIR]

On-policy distillation's claim is that a dense teacher signal (every sampled token scored) beats a
sparse reward (one number per completion) on compute. For each seed this runs, one after the other on
the same machine, `python train.py method=grpo`, `method=opd` and `method=gkd` from the embedded base
model with the same budget (max_steps, prompts per step, samples per prompt), logging held-out accuracy
every --eval-every steps (`eval_every`; `elapsed_s` is training time without the evaluations). It
prints, per method, the first step (and its elapsed seconds) at which held-out accuracy reaches
    distillation target  = the teacher's held-out accuracy − 0.03
    GRPO's target        = GRPO's own final accuracy
and the final accuracies. The claim holds when opd/gkd reach their target in fewer steps and less
time than GRPO reaches its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from trainer.paths import REPO

ONLY_ARITHMETIC = ["data.eval.style=null", "data.eval.harmful=null", "data.eval.sft=null", "data.eval.preference=null"]


def teacher_accuracy(path: str) -> float:
    from evaluation.metrics import Evaluator
    from model.load import load_model

    model, tok = load_model(os.path.join(REPO, path), dtype="fp32", device="cpu")
    return Evaluator(tok, {"arithmetic": "data/synthetic/grpo_eval.jsonl"})(model)["accuracy"]


def run(method: str, seed: int, out: str, eval_every: int, max_steps: int) -> list[dict]:
    run_dir = os.path.join(out, f"{method}_s{seed}")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"method={method}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", "progress=false", f"eval_every={eval_every}", f"method.max_steps={max_steps}",
           *ONLY_ARITHMETIC]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [{"step": r["step"] + 1, "elapsed_s": r["elapsed_s"], "accuracy": r["eval/accuracy"]}
             for r in rows if "eval/accuracy" in r]
    final = json.load(open(os.path.join(run_dir, "eval.json")))["after"]["accuracy"]
    last = [r for r in rows if "loss" in r][-1]
    return evals + [{"step": last["step"] + 1, "elapsed_s": last["elapsed_s"], "accuracy": final}]


def first_reaching(curve: list[dict], target: float):
    return next((p for p in curve if p["accuracy"] >= target - 1e-9), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=80)
    ap.add_argument("--teacher", default="assets/tiny-qwen3-teacher")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="bench_distill_")
    t_acc = teacher_accuracy(args.teacher)
    print(f"teacher {args.teacher}: held-out accuracy {t_acc}; distillation target {t_acc - 0.03:.3f}")
    results = {}
    for seed in args.seeds:
        curves = {m: run(m, seed, out, args.eval_every, args.max_steps) for m in ("grpo", "opd", "gkd")}
        grpo_final = curves["grpo"][-1]["accuracy"]
        print(f"\nseed {seed}   (curves: {out})")
        print(f"{'method':<6} {'target':>7} {'reached at step':>16} {'elapsed s':>10} {'final acc':>10} {'total s':>8}")
        for m, curve in curves.items():
            target = grpo_final if m == "grpo" else t_acc - 0.03
            hit = first_reaching(curve, target)
            step, secs = (str(hit["step"]), f"{hit['elapsed_s']:.1f}") if hit else ("never", "-")
            print(f"{m:<6} {target:>7.3f} {step:>16} {secs:>10} {curve[-1]['accuracy']:>10.3f} "
                  f"{curve[-1]['elapsed_s']:>8.1f}")
            results.setdefault(m, []).append({"seed": seed, "target": target, "reached": hit, "curve": curve})
    with open(os.path.join(out, "bench_distill.json"), "w") as f:
        json.dump({"teacher_accuracy": t_acc, "results": results}, f, indent=1)
    print(f"\nwrote {os.path.join(out, 'bench_distill.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
