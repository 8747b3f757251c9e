"""Run lineage (trainer/lineage.py): lineage.json names the code, config, model, data and machine of a run
and its parent run; the model card is one the hub parses (huggingface_hub's own ModelCard)."""
import hashlib
import json
import os
import subprocess

import pytest

from trainer import lineage
from trainer.config import compose


def test_lineage_names_code_config_model_data_libraries_and_machine(tmp_path):
    cfg = compose(["method=sft", "data.eval.style=null"])
    rec = lineage.build(cfg, str(tmp_path))
    head = subprocess.run(["git", "-C", lineage.REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    head = head.stdout.strip()
    assert rec["code"]["commit"] == head and isinstance(rec["code"]["dirty"], bool)
    assert rec["config"]["method"]["lr"] == cfg.method.lr and rec["config"]["data"]["max_length"] == 256
    st = os.path.join(lineage.REPO, "assets", "tiny-qwen3", "model.safetensors")
    digest = hashlib.sha256(open(st, "rb").read()).hexdigest()
    assert rec["base_model"]["safetensors"] == {"model.safetensors": digest}
    train = next(d for d in rec["data"] if d["role"] == "train")
    path = os.path.join(lineage.REPO, "data", "synthetic", "sft_train.jsonl")
    assert train["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert train["rows"] == sum(1 for line in open(path, "rb") if line.strip())
    assert "eval/style" not in {d["role"] for d in rec["data"]} and "eval/arithmetic" in {d["role"] for d in rec["data"]}
    assert rec["libraries"]["torch"] and rec["machine"]["world_size"] == 1 and rec["machine"]["cpu"]
    assert rec["parent"] is None


def test_a_dataset_source_records_split_columns_and_rows(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `hf` extra (datasets) is not installed")
    path = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"q": "What is 1 + 1?", "a": "2"}] * 5).to_parquet(str(path))
    rec = lineage.build(compose(["method=grpo", f"data.train={path}", "data.columns={prompt: q, answer: a}"]),
                        str(tmp_path))
    train = next(d for d in rec["data"] if d["role"] == "train")
    assert train["rows"] == 5 and train["split"] == "train" and train["columns"] == {"prompt": "q", "answer": "a"}
    assert train["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_hub_snapshot_records_its_id_revision_and_blob_hashes(tmp_path):
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny"
    blob = "ab" * 32
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / blob).write_bytes(b"not read: the blob's name is its sha256")
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    os.symlink(f"../../blobs/{blob}", snap / "model.safetensors")
    info = lineage.base_model(str(snap))
    assert (info["hub_id"], info["revision"], info["safetensors"]) == ("someorg/tiny", rev, {"model.safetensors": blob})


def test_a_stage_and_a_resumed_run_point_to_their_parent(tmp_path, monkeypatch):
    prev = tmp_path / "1_sft"
    (prev / "checkpoints" / "final").mkdir(parents=True)
    (prev / "lineage.json").write_text("{}")
    monkeypatch.setenv(lineage.PIPELINE_ENV, f"{tmp_path}\tgrpo")
    rec = lineage.build(compose(["method=grpo", f"model.path={prev / 'checkpoints' / 'final'}"]), str(tmp_path / "2"))
    assert rec["parent"] == {"kind": "model", "checkpoint": str(prev / "checkpoints" / "final"), "run_dir": str(prev)}
    assert rec["pipeline"] == {"dir": str(tmp_path), "stage": "grpo"}
    (prev / "checkpoints" / "step_4").mkdir()
    rec = lineage.build(compose(["method=sft", f"resume={prev}"]), str(tmp_path / "3"))
    assert rec["parent"] == {"kind": "resume", "checkpoint": str(prev / "checkpoints" / "step_4"), "run_dir": str(prev)}
    report = {"stages": [{"name": "sft", "dir": str(prev), "returncode": 0},
                         {"name": "grpo", "dir": str(tmp_path / "2_grpo"), "returncode": 0}], "result": "x"}
    lineage.write_pipeline(str(tmp_path), report, "assets/tiny-qwen3")
    stages = json.loads((tmp_path / "lineage.json").read_text())["stages"]
    assert [s["parent"] for s in stages] == [None, str(prev)]


def test_the_model_card_is_one_the_hub_parses(tmp_path):
    from huggingface_hub import ModelCard

    rec = lineage.build(compose(["method=sft"]), str(tmp_path))
    rec["base_model"]["hub_id"] = "Qwen/Qwen3-0.6B"
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    results = {"before": {"accuracy": 0.455}, "after": {"accuracy": 0.865},
               "gates": {"accuracy": {"value": 0.865, "threshold": 0.6, "min": True, "pass": True}}}
    card = ModelCard.load(lineage.write_model_card(str(final), rec, results))
    meta = card.data.to_dict()
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["tags"] == ["posttrain", "sft"]
    assert "| accuracy | 0.455 | 0.865 |" in card.text and "- gate `accuracy`: 0.865 (>= 0.6) PASS" in card.text
    assert rec["command"] in card.text and "data/synthetic/sft_train.jsonl" in card.text
    assert "**Method:** `sft` (loss `sft`, 2 epoch(s)), full weights." in card.text
