"""batches.py: the batch kinds feed the losses the right tensors (on the embedded model)."""
import os

import pytest
import torch

import batches
from losses.common import sequence_logprobs
from data.formats import collate
from model.load import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data", "synthetic")


@pytest.fixture(scope="module")
def tiny():
    return load_model(os.path.join(REPO, "assets", "tiny-qwen3"), dtype="fp32", device="cpu")


def test_pairs_concatenated_forward_equals_separate_forwards(tiny):
    model, tok = tiny
    ex = batches.load_examples(os.path.join(DATA, "preference_eval.jsonl"), "pairs", "preference", tok, 256)[:5]
    inputs, ntok = batches.loss_inputs("pairs", model, model, ex, tok, "cpu")
    for side in ("chosen", "rejected"):
        b = collate([e[side] for e in ex], tok.pad_token_id)
        logp, mask = sequence_logprobs(model, b["input_ids"], b["loss_mask"])
        T = logp.shape[1]
        got, got_mask = inputs[f"policy_{side}_logps"], inputs[f"{side}_mask"]
        # the concatenated batch is padded to the longer side: same values on the real positions, mask 0 beyond
        torch.testing.assert_close(got[:, :T] * got_mask[:, :T], logp * mask, atol=1e-5, rtol=1e-5)
        assert got_mask[:, T:].sum() == 0
        torch.testing.assert_close(inputs[f"ref_{side}_logps"][:, :T] * mask, logp * mask, atol=1e-5, rtol=1e-5)
    assert ntok == sum(len(e["chosen"]["input_ids"]) + len(e["rejected"]["input_ids"]) for e in ex)


def test_precomputed_reference_equals_live_reference(tiny):
    model, tok = tiny
    ex = batches.load_examples(os.path.join(DATA, "preference_eval.jsonl"), "pairs", "preference", tok, 256)[:6]
    live, _ = batches.loss_inputs("pairs", model, model, ex, tok, "cpu")
    batches.precompute_reference(model, ex, "pairs", tok, "cpu", batch_size=4)
    cached, _ = batches.loss_inputs("pairs", model, None, ex, tok, "cpu")
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        m = live["chosen_mask" if "chosen" in k else "rejected_mask"]
        torch.testing.assert_close(cached[k] * m, live[k] * m, atol=1e-5, rtol=1e-5)


def test_unpaired_batch_builds_mismatched_kl_pairs(tiny):
    model, tok = tiny
    ex = batches.load_examples(os.path.join(DATA, "kto_eval.jsonl"), "unpaired", "kto", tok, 256)[:4]
    inputs, _ = batches.loss_inputs("unpaired", model, model, ex, tok, "cpu")
    assert inputs["labels"].tolist() == [e["label"] for e in ex]
    assert inputs["kl_policy_logps"].shape[0] == 4 and not inputs["kl_policy_logps"].requires_grad
    # policy == reference here, so every log-ratio is zero
    torch.testing.assert_close(inputs["kl_policy_logps"] * inputs["kl_mask"], inputs["kl_ref_logps"] * inputs["kl_mask"])


def test_resolve_and_call_loss_pass_only_accepted_arguments():
    fn = batches.resolve_loss("simpo")
    assert fn.__name__ == "simpo_loss"
    assert batches.resolve_loss("losses.dpo:dpo_loss").__name__ == "dpo_loss"
    seen = {}

    def loss(policy_chosen_logps, chosen_mask, beta=1.0):
        seen.update(beta=beta)
        return policy_chosen_logps.sum(), {}

    batches.call_loss(loss, {"policy_chosen_logps": torch.ones(2), "chosen_mask": None, "ref_chosen_logps": 1}, {"beta": 3})
    assert seen == {"beta": 3}
    with pytest.raises(ValueError, match="unknown batch kind"):
        batches.load_examples("x", "triples", "preference", None, 8)


@pytest.mark.parametrize("kind,fmt,path", [("pairs", "preference", "preference_eval.jsonl"),
                                           ("unpaired", "kto", "kto_eval.jsonl")])
def test_padding_free_inputs_equal_padded_inputs(tiny, kind, fmt, path):
    model, tok = tiny
    ex = batches.load_examples(os.path.join(DATA, path), kind, fmt, tok, 256)[:8]
    packed, n_packed = batches.loss_inputs(kind, model, model, ex, tok, "cpu", padding_free=True)
    padded, n_padded = batches.loss_inputs(kind, model, model, ex, tok, "cpu", padding_free=False)
    assert n_packed == n_padded and packed.keys() == padded.keys()
    for k, v in padded.items():
        torch.testing.assert_close(packed[k], v, atol=1e-5, rtol=1e-5, msg=k)
    # gradients through the unpacking reach the same parameters with the same values
    model.zero_grad()
    sum(packed[k].sum() for k in packed if k.startswith("policy_")).backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    padded, _ = batches.loss_inputs(kind, model, model, ex, tok, "cpu", padding_free=False)
    sum(padded[k].sum() for k in padded if k.startswith("policy_")).backward()
    for a, b in zip(g_packed, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    model.zero_grad()
