"""trainer/feeds: each dataset kind feeds its loss the right tensors (on the embedded model)."""
import pytest
import torch

from conftest import make_feed
from data.formats import collate
from losses import call_loss, resolve_loss
from losses.common import sequence_logprobs
from trainer.feeds.pairs import precompute_reference

PAIRS = ["method=dpo", "data.train=data/synthetic/preference_eval.jsonl"]
KTO = ["method=kto", "data.train=data/synthetic/kto_eval.jsonl"]


def test_pairs_concatenated_forward_equals_separate_forwards(tiny):
    model, tok = tiny
    f = make_feed(PAIRS + ["method.padding_free=false"], tok, n_rows=5)
    ex = f.examples
    inputs, ntok, _ = f.loss_inputs(model, model, ex)
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
    f = make_feed(PAIRS, tok, n_rows=6)
    live, _, _ = f.loss_inputs(model, model, f.examples)
    precompute_reference(model, f.examples, tok, "cpu", batch_size=4)
    cached, _, _ = f.loss_inputs(model, None, f.examples)
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        m = live["chosen_mask" if "chosen" in k else "rejected_mask"]
        torch.testing.assert_close(cached[k] * m, live[k] * m, atol=1e-5, rtol=1e-5)


def test_unpaired_batch_builds_mismatched_kl_pairs(tiny):
    model, tok = tiny
    f = make_feed(KTO, tok, n_rows=4)
    inputs, _, _ = f.loss_inputs(model, model, f.examples)
    assert inputs["labels"].tolist() == [e["label"] for e in f.examples]
    assert inputs["kl_policy_logps"].shape[0] == 4 and not inputs["kl_policy_logps"].requires_grad
    # policy == reference here, so every log-ratio is zero
    torch.testing.assert_close(inputs["kl_policy_logps"] * inputs["kl_mask"], inputs["kl_ref_logps"] * inputs["kl_mask"])


def test_mismatched_kl_pairs_are_truncated_to_max_length(tiny, tmp_path):
    """The KL reference point pairs prompt i with completion i+1: a long completion must be cut to
    data.max_length like every example (it was tokenized whole: a 10 MB line tried to allocate TBs)."""
    model, tok = tiny
    path = tmp_path / "kto.jsonl"
    path.write_text('{"prompt": "hi", "completion": "ok", "label": true}\n'
                    f'{{"prompt": "hey", "completion": "{"word " * 400}", "label": false}}\n')
    f = make_feed(["method=kto", f"data.train={path}", "data.max_length=32"], tok)
    inputs, _, _ = f.loss_inputs(model, None, f.examples)
    assert inputs["kl_policy_logps"].shape[1] <= 31


def test_resolve_and_call_loss_pass_only_accepted_arguments():
    fn = resolve_loss("simpo")
    assert fn.__name__ == "simpo_loss"
    assert resolve_loss("losses.dpo:dpo_loss").__name__ == "dpo_loss"
    seen = {}

    def loss(policy_chosen_logps, chosen_mask, beta=1.0):
        seen.update(beta=beta)
        return policy_chosen_logps.sum(), {}

    call_loss(loss, {"policy_chosen_logps": torch.ones(2), "chosen_mask": None, "ref_chosen_logps": 1}, {"beta": 3})
    assert seen == {"beta": 3}


@pytest.mark.parametrize("base", [PAIRS, KTO], ids=["pairs", "unpaired"])
def test_padding_free_inputs_equal_padded_inputs(tiny, base):
    model, tok = tiny
    packed_feed = make_feed(base + ["method.padding_free=true"], tok, n_rows=8)
    padded_feed = make_feed(base + ["method.padding_free=false"], tok, n_rows=8)
    ex = packed_feed.examples
    packed, n_packed, _ = packed_feed.loss_inputs(model, model, ex)
    padded, n_padded, _ = padded_feed.loss_inputs(model, model, ex)
    assert n_packed == n_padded and packed.keys() == padded.keys()
    for k, v in padded.items():
        torch.testing.assert_close(packed[k], v, atol=1e-5, rtol=1e-5, msg=k)
    # gradients through the unpacking reach the same parameters with the same values
    model.zero_grad()
    sum(packed[k].sum() for k in packed if k.startswith("policy_")).backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    padded, _, _ = padded_feed.loss_inputs(model, model, ex)
    sum(padded[k].sum() for k in padded if k.startswith("policy_")).backward()
    for a, b in zip(g_packed, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    model.zero_grad()
