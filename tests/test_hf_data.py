"""Hugging Face datasets as input (data/hf.py): local parquet / arrow / CSV / JSON files, save_to_disk
directories and a hub id read from an offline cache, renamed by data.columns and validated like JSONL.
Every fixture is built here in tmp_path; nothing is downloaded."""
import glob
import json
import os
import re
import shutil

import pytest

datasets = pytest.importorskip("datasets", reason="the `hf` extra (datasets) is not installed")

from data import hf  # noqa: E402
from data.formats import DataError, load_dataset, read_jsonl, read_prompts  # noqa: E402

ROWS = [{"question": "What is 2 + 3?", "final_answer": "5", "source": "a"},
        {"question": "What is 7 - 4?", "final_answer": 3, "source": "b"},
        {"question": "What is 1 + 1?", "final_answer": "2", "source": "c"}]
EXPECTED = [{"prompt": r["question"], "answer": r["final_answer"], "source": r["source"]} for r in ROWS]


@pytest.fixture(autouse=True)
def fresh_options(tmp_path, monkeypatch):
    """Each test starts from the default options, with datasets' cache inside tmp_path and offline."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    hf.configure()
    yield
    hf.configure()


def as_dataset(rows):
    # "final_answer" mixes str and int in ROWS: arrow needs one type, so strings throughout
    return datasets.Dataset.from_list([{**r, "final_answer": str(r["final_answer"])} for r in rows])


def test_parquet_csv_json_and_arrow_files_read_like_the_seed_format(tmp_path):
    ds = as_dataset(ROWS)
    paths = {"parquet": tmp_path / "d.parquet", "csv": tmp_path / "d.csv", "json": tmp_path / "d.json"}
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.to_json(str(paths["json"]))  # JSON lines in a .json file: datasets' json builder reads both
    ds.save_to_disk(str(tmp_path / "disk"))
    paths["arrow"] = glob.glob(str(tmp_path / "disk" / "*.arrow"))[0]
    hf.configure(columns={"prompt": "question", "answer": "final_answer"})
    want = [{**r, "answer": str(r["answer"])} for r in EXPECTED]
    for kind, path in paths.items():
        got = read_jsonl(str(path), "prompt", require=("answer",))
        # CSV reads the all-digit column back as integers: the seed format takes numbers or strings
        assert [{**r, "answer": str(r["answer"])} for r in got] == want, kind
    assert read_jsonl(str(tmp_path / "disk"), "prompt", require=("answer",))[0]["prompt"] == "What is 2 + 3?"


def test_a_bad_row_names_the_row_the_field_and_its_column_before_anything_trains(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["question"] = "   "
    path = tmp_path / "bad.parquet"
    as_dataset(rows).to_parquet(str(path))
    hf.configure(columns={"prompt": "question"})
    with pytest.raises(DataError) as e:
        read_jsonl(str(path), "prompt")
    assert str(e.value) == (f"{path}:row 2: field 'prompt' (column 'question'): expected a non-empty string, "
                            "got empty string '   '")
    hf.configure(columns={"prompt": "query"})
    with pytest.raises(DataError, match=r"data\.columns\.prompt: no column 'query' in the dataset; its columns: "
                                        r"question, final_answer, source"):
        read_jsonl(str(path), "prompt")
    hf.configure()  # no mapping: the seed field itself is missing
    with pytest.raises(DataError, match=re.escape(f"{path}:row 0: field 'prompt': expected a non-empty string, "
                                                  "got nothing (field missing)")):
        read_jsonl(str(path), "prompt")


def test_a_jsonl_path_keeps_the_jsonl_reader_and_a_plain_directory_its_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert not hf.is_dataset_source(str(path)) and not hf.is_dataset_source(str(tmp_path))
    assert hf.is_dataset_source("org/name") and hf.is_dataset_source("x.parquet")
    with pytest.raises(DataError, match="expected a JSONL file, got a directory"):
        read_jsonl(str(tmp_path), "prompt")
    with pytest.raises(FileNotFoundError, match="missing.parquet: data file not found"):
        read_jsonl(str(tmp_path / "missing.parquet"), "prompt")


def test_chat_messages_train_as_sft_and_splits_come_from_data_split(tmp_path, tiny):
    _, tok = tiny
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Answer: 4"}]
    train = datasets.Dataset.from_list([{"conversations": conv}] * 3)
    test = datasets.Dataset.from_list([{"conversations": conv[:1]}])  # no assistant turn: a bad row
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "chat"))
    hf.configure(columns={"messages": "conversations"})
    examples, stats = load_dataset(str(tmp_path / "chat"), "sft", tok, 64)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text((json.dumps({"messages": conv}) + "\n") * 3)
    assert examples == load_dataset(str(jsonl), "sft", tok, 64)[0] and stats["n"] == 3
    hf.configure(columns={"messages": "conversations"}, split="test")
    with pytest.raises(DataError, match=r"chat:row 0: field 'messages' \(column 'conversations'\): expected at least "
                                        r"one assistant message"):
        load_dataset(str(tmp_path / "chat"), "sft", tok, 64)
    hf.configure(split="validation")
    with pytest.raises(DataError, match=r"no split 'validation' \(data.split\); the dataset has test, train"):
        load_dataset(str(tmp_path / "chat"), "sft", tok, 64)


def make_hub_cache(tmp_path, repo_id: str, splits: dict) -> None:
    """A dataset `repo_id` in datasets' offline cache, as a download would have left it."""
    cache = datasets.config.HF_DATASETS_CACHE
    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        as_dataset(rows).to_parquet(files[split])
    datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
    src = next(p for p in glob.glob(os.path.join(cache, "parquet", "default-*", "0.0.0", "*")) if os.path.isdir(p))
    dst = os.path.join(cache, repo_id.replace("/", "___"), "default", "0.0.0", os.path.basename(src))
    shutil.copytree(src, dst)
    for f in glob.glob(os.path.join(dst, "parquet-*.arrow")):
        os.rename(f, f.replace("parquet-", repo_id.split("/")[1] + "-"))


def test_a_hub_id_reads_from_the_offline_cache_with_its_split(tmp_path, tiny):
    _, tok = tiny
    make_hub_cache(tmp_path, "someorg/mathqa", {"train": ROWS, "test": ROWS[:1]})
    hf.configure(columns={"prompt": "question", "answer": "final_answer"}, split="test")
    rows, stats = read_prompts("someorg/mathqa", "prompt", tok, 64, require=("answer",))
    assert rows == [{**EXPECTED[0], "answer": "5"}] and stats == {"n": 1, "truncated": 0}
    with pytest.raises(DataError, match=r"otherorg/none: cannot read the dataset"):
        read_jsonl("otherorg/none", "prompt")  # offline and not cached: one line, no download


def test_streaming_validates_every_row_and_reads_them_lazily(tmp_path):
    rows = [{"question": f"q{i}", "final_answer": str(i), "source": "s"} for i in range(2500)]
    path = tmp_path / "big.parquet"
    as_dataset(rows).to_parquet(str(path))
    hf.configure(columns={"prompt": "question"}, streaming=True)
    lazy = read_jsonl(str(path), "prompt")
    assert isinstance(lazy, hf.LazyRows) and len(lazy) == 2500
    assert lazy[2499] == {"prompt": "q2499", "final_answer": "2499", "source": "s"}
    assert [r["prompt"] for r in lazy[10:13]] == ["q10", "q11", "q12"]
    rows[2222]["question"] = None  # past the first batch of BATCH rows: every batch is checked
    as_dataset(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"big.parquet:row 2222: field 'prompt' \(column 'question'\): expected a "
                                        r"non-empty string, got null"):
        read_jsonl(str(path), "prompt")


def test_eval_entries_take_their_own_split_and_columns(tmp_path):
    from trainer.config import compose

    path = tmp_path / "qa.parquet"
    as_dataset(ROWS).to_parquet(str(path))
    cfg = compose(["method=sft", "+data.eval.qa={task: exact_match, path: " + str(path) + ", split: train, "
                   "columns: {prompt: question, answer: final_answer}}", "data.columns={prompt: nothing}"])
    from evaluation.metrics import held_out_sets
    from tasks import build_task

    hf.configure(cfg.data, {v["path"]: v for v in held_out_sets(cfg).values() if isinstance(v, dict)})
    task = build_task("qa", held_out_sets(cfg)["qa"])
    assert [r["answer"] for r in task.rows] == ["5", "3", "2"]
