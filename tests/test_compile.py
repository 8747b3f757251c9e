"""model.compile=true: the transformer blocks run through torch.compile (inductor) and train to the
same losses as eager mode (tolerance 1e-4 relative: fused kernels reorder floating-point sums)."""
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_losses(run_dir, *extra):
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", "progress=false",
                          "eval_before=false", "eval_after=false", "method=sft", "method.max_steps=3",
                          "method.batch_size=4", *extra], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def test_compiled_blocks_train_like_eager(tmp_path):
    stdout, compiled = sft_losses(tmp_path / "compiled", "model.compile=true")
    assert "torch.compile: 4 transformer blocks" in stdout
    _, eager = sft_losses(tmp_path / "eager")
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-6)
