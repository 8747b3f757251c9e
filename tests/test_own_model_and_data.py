"""README "Use your own model and data", run as written: a local HF model directory (the embedded model
copied, standing in for yours), a parquet file with its own column names, a held-out parquet set and a
tracker. The commands are WALKTHROUGH below; README.md carries the same block (checked once it has the
section). Paths are the only thing changed to run them: `python` is this interpreter, `train.py` and
`assets/` are the repository's, and the working directory is a temporary one (bash -eu runs the block)."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Use your own model and data"

WALKTHROUGH = """\
cp -r assets/tiny-qwen3 my-model
python -c "
from datasets import Dataset
Dataset.from_list([{'question': f'What is {a} + {b}?', 'response': f'Answer: {a + b}'} for a in range(8) for b in range(8)]).to_parquet('my-data.parquet')
Dataset.from_list([{'question': f'What is {a} + 9?', 'solution': a + 9} for a in range(10)]).to_parquet('my-eval.parquet')"
python train.py method=sft model.path=my-model data.train=my-data.parquet 'data.columns={instruction: question, output: response}' '+data.eval.mine={task: exact_match, path: my-eval.parquet, match: numeric, columns: {prompt: question, answer: solution}}' logger=tensorboard method.max_steps=4 eval_max_examples=16 hydra.run.dir=runs/mine
"""


def runnable(script: str) -> str:
    script = script.replace(" train.py ", f" {os.path.join(REPO, 'train.py')} ")
    return script.replace("assets/tiny-qwen3", os.path.join(REPO, "assets", "tiny-qwen3"))


def test_the_readme_block_is_the_one_tested():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    if HEADING not in text:
        pytest.skip(f"README.md has no {HEADING!r} section yet")
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks and blocks[0] == WALKTHROUGH


def test_your_own_model_directory_parquet_data_and_a_tracker(tmp_path):
    pytest.importorskip("datasets", reason="the `hf` extra (datasets) is not installed")
    pytest.importorskip("tensorboard", reason="the `trackers` extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bin_dir = tmp_path / "bin"  # `python` in the commands is this interpreter
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a symlink would lose the venv
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    out = subprocess.run(["bash", "-euc", runnable(WALKTHROUGH)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "mine"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("loss")] == [(r["step"], r["loss"]) for r in lines]
    ev = json.loads((run / "eval.json").read_text())
    assert 0.0 <= ev["after"]["mine/exact_match"] <= 1.0 and "accuracy" in ev["after"]
    lin = json.loads((run / "lineage.json").read_text())
    assert lin["base_model"]["dir"] == str(tmp_path / "my-model")
    assert lin["base_model"]["safetensors"]["model.safetensors"] == lineage_sha(REPO + "/assets/tiny-qwen3")
    train = next(d for d in lin["data"] if d["role"] == "train")
    assert train["rows"] == 64 and train["columns"] == {"instruction": "question", "output": "response"}
    mine = next(d for d in lin["data"] if d["role"] == "eval/mine")
    assert mine["rows"] == 10 and mine["columns"] == {"prompt": "question", "answer": "solution"}
    card = (run / "checkpoints" / "final" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "my-data.parquet" in card
    assert "| mine/exact_match |" in card and "data.train=my-data.parquet" in card


def lineage_sha(model_dir: str) -> str:
    import hashlib

    return hashlib.sha256(open(os.path.join(model_dir, "model.safetensors"), "rb").read()).hexdigest()
