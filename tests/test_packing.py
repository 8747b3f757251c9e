"""Padding-free SFT: packed rows compute exactly what their examples compute alone."""
import os
import subprocess
import sys

import torch

from data.formats import collate, load_dataset, pack_examples
from losses.common import masked_mean, sequence_logprobs
from model.load import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "assets", "tiny-qwen3")


def examples(n=12):
    _, tok = load_model(TINY, dtype="fp32", device="cpu", with_tokenizer=True)
    rows = load_dataset(os.path.join(REPO, "data", "synthetic", "sft_train.jsonl"), "sft", tok, 256)[0][:n]
    return rows, tok


def test_pack_examples_keeps_order_never_splits_and_respects_the_length():
    rows, _ = examples()
    packed = pack_examples(rows, 64)
    assert all(len(r["input_ids"]) <= 64 for r in packed)
    assert len(packed) < len(rows)
    flat = [(r["input_ids"][i], r["document_ids"][i]) for r in packed for i in range(len(r["input_ids"]))]
    assert [t for t, _ in flat] == [t for e in rows for t in e["input_ids"]]
    for r in packed:  # documents are numbered 0, 1, ... in each row, each one whole example
        docs = r["document_ids"]
        assert docs[0] == 0 and all(b - a in (0, 1) for a, b in zip(docs, docs[1:]))


def test_packed_rows_give_each_example_its_own_logits_and_the_same_loss():
    rows, tok = examples()
    model, _ = load_model(TINY, dtype="fp32", device="cpu", with_tokenizer=False)
    packed = collate(pack_examples(rows, 96), tok.pad_token_id)
    padded = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        logits = model(packed["input_ids"], document_ids=packed["document_ids"])
        # every document of row 0 against the example run alone
        doc = packed["document_ids"][0]
        for d in range(int(doc.max()) + 1):
            span = (doc == d).nonzero().flatten()
            alone = model(packed["input_ids"][:1, span])
            torch.testing.assert_close(logits[0, span], alone[0], atol=1e-5, rtol=1e-5)
        lp, m = sequence_logprobs(model, packed["input_ids"], packed["loss_mask"], document_ids=packed["document_ids"])
        lq, n = sequence_logprobs(model, padded["input_ids"], padded["loss_mask"])
    assert m.sum() == n.sum()  # the same trained tokens
    torch.testing.assert_close(masked_mean(-lp, m), masked_mean(-lq, n), atol=1e-6, rtol=1e-5)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # and less padding


def test_sft_with_packing_trains(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"hydra.run.dir={run_dir}", "progress=false",
                          "eval_before=false", "eval_after=false", "method=sft", "method.packing=true",
                          "method.max_steps=3", "method.batch_size=2", "data.max_length=128"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "packed " in out.stdout and " rows of up to 128 tokens" in out.stdout
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").exists()
