"""steering/: capture, directions, runtime steering, direction ablation, abliteration, vector files.

Behaviour is checked on the embedded model (assets/tiny-qwen3), which refuses the forbidden topic
and follows the style cue; error cases use tiny random models. Generation-based numbers use short
completions (the judged prefixes "I can't" / "Happy to help!" are a few tokens) to stay fast.
"""
import copy
import json

import pytest
import torch

from data.formats import DataError, read_jsonl
from evaluation.metrics import generate_texts
from model.config import ModelConfig
from model.load import load_model, save_model
from model.transformer import Transformer
from rollout.sampler import SamplingConfig, generate
from tasks.arithmetic import is_correct
from tasks.harmful import is_refusal
from tasks.style import is_styled
from steering.abliterate import orthogonal_residual, orthogonalize
from steering.capture import capture, check_layers, encode_prompts, left_pad, load_prompts
from steering.directions import (Candidate, first_token_kl, first_token_logprobs, format_table, mean_difference,
                                 pca_difference, select)
from steering.hooks import Steerer, ablate_direction, add_vector
from steering.vectors import SteeringVector

MODEL = "assets/tiny-qwen3"
SYN = "data/synthetic"


def prompts(name):
    return load_prompts(f"{SYN}/{name}.jsonl")


@pytest.fixture(scope="module")
def tiny():
    return load_model(MODEL, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def refusal_direction(tiny):
    """The configured abliteration direction: layer 1, mean over the instruction tokens."""
    model, tok = tiny
    a = capture(model, tok, prompts("harmful_train"), [1], "instruction")
    b = capture(model, tok, prompts("harmless_train"), [1], "instruction")
    return mean_difference(a, b)[0]


@pytest.fixture(scope="module")
def style_vector(tiny):
    """The configured style vector: last prompt token, layer 3."""
    model, tok = tiny
    a = capture(model, tok, prompts("style_cue_train"), [3], [-1])
    b = capture(model, tok, prompts("style_plain_train"), [3], [-1])
    return mean_difference(a, b)[0]


@torch.no_grad()
def logits_of(model, tok, texts):
    ids, mask = left_pad(encode_prompts(tok, texts), tok.pad_token_id, "cpu")
    return model(ids, attention_mask=mask)


def random_model(hidden=64, layers=2, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


# ----------------------------------------------------------------------------- abliteration
@pytest.mark.parametrize("tie", [True, False])
def test_orthogonalised_weights_have_no_component_along_the_direction(tie):
    model = random_model(tie=tie)
    original = copy.deepcopy(model)
    r = torch.randn(64)
    assert max(orthogonal_residual(model, r).values()) > 1e-2
    orthogonalize(model, r)
    assert max(orthogonal_residual(model, r).values()) < 1e-5
    # what reads the stream is untouched: the output matrix is the original embedding
    torch.testing.assert_close(model.lm_head_weight, original.lm_head_weight, rtol=0, atol=0)
    assert model.config.tie_word_embeddings is False and "lm_head.weight" in model.state_dict()
    # q/k/v/gate/up (readers) are untouched too
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight,
                               original.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)


def test_per_layer_weights_and_keeping_tied_embeddings():
    model = random_model()
    original = copy.deepcopy(model)
    r = torch.randn(64)
    orthogonalize(model, r, layer_weights={1: 0.0}, tied="keep")
    res = orthogonal_residual(model, r)
    assert res["model.embed_tokens.weight"] < 1e-5 and res["model.layers.0.mlp.down_proj.weight"] < 1e-5
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               original.model.layers[1].mlp.down_proj.weight, rtol=0, atol=0)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in model.state_dict()


@pytest.mark.parametrize("tied,weights", [("keep", None), ("untie", [1.0, 0.5, 0.0, 1.0])])
def test_runtime_ablation_matches_orthogonalised_weights(tiny, refusal_direction, tied, weights):
    model, tok = tiny
    texts = prompts("harmful_eval")[:4] + prompts("harmless_eval")[:4]
    with ablate_direction(model, refusal_direction, weights, unembed=tied == "keep"):
        runtime = logits_of(model, tok, texts)
    abl = orthogonalize(copy.deepcopy(model), refusal_direction, weights, tied=tied)
    torch.testing.assert_close(logits_of(abl, tok, texts), runtime, atol=1e-4, rtol=1e-4)


def test_abliterated_checkpoint_equals_runtime_ablation_in_any_hf_loader(tiny, refusal_direction, tmp_path):
    model, tok = tiny
    texts = prompts("harmful_eval")[:4] + prompts("harmless_eval")[:4]
    with ablate_direction(model, refusal_direction):
        runtime = logits_of(model, tok, texts)
    save_model(orthogonalize(copy.deepcopy(model), refusal_direction), str(tmp_path / "abl"), tok)
    loaded, _ = load_model(str(tmp_path / "abl"), dtype="fp32", device="cpu")
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(logits_of(loaded, tok, texts), runtime, atol=1e-4, rtol=1e-4)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "abl")).float().eval()
    ids, mask = left_pad(encode_prompts(tok, texts), tok.pad_token_id, "cpu")
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # HF gives pad positions arbitrary values; compare the real tokens
    torch.testing.assert_close(out[real], runtime[real], atol=1e-4, rtol=1e-4)


def test_abliteration_removes_refusal_and_keeps_the_rest(tiny, refusal_direction):
    """Held-out: refusal_rate >= 0.9 -> <= 0.05, accuracy within 2 points, first-token kl <= 0.1."""
    model, tok = tiny
    harmful, harmless = prompts("harmful_eval"), prompts("harmless_eval")
    arith = read_jsonl(f"{SYN}/grpo_eval.jsonl", "prompt")

    def measure(m):
        refusal = sum(map(is_refusal, generate_texts(m, tok, harmful, max_new_tokens=8))) / len(harmful)
        texts = generate_texts(m, tok, [r["prompt"] for r in arith], max_new_tokens=8, batch_size=200)
        accuracy = sum(is_correct(t, str(r["answer"])) for t, r in zip(texts, arith)) / len(arith)
        return refusal, accuracy, first_token_logprobs(m, tok, harmless)

    refusal0, acc0, logp0 = measure(model)
    abl = orthogonalize(copy.deepcopy(model), refusal_direction)
    refusal1, acc1, logp1 = measure(abl)
    assert refusal0 >= 0.9 and refusal1 <= 0.05, (refusal0, refusal1)
    assert abs(acc1 - acc0) <= 0.02, (acc0, acc1)
    assert first_token_kl(logp1, logp0) <= 0.1


# ----------------------------------------------------------------------------- steering
def test_style_vector_raises_style_rate_and_removal_restores_the_model(tiny, style_vector):
    model, tok = tiny
    held_out = prompts("style_eval")[::2]  # 100 held-out prompts, half arithmetic, half topics
    before = logits_of(model, tok, held_out[:6])
    rate0 = sum(map(is_styled, generate_texts(model, tok, held_out, max_new_tokens=5, batch_size=100))) / len(held_out)
    with add_vector(model, style_vector, [3], coefficient=1.0, apply_to="prompt"):
        steered = generate_texts(model, tok, held_out, max_new_tokens=5, batch_size=100)  # KV-cached, no_grad
        assert not torch.equal(logits_of(model, tok, held_out[:6]), before)
    rate1 = sum(map(is_styled, steered)) / len(held_out)
    assert rate0 <= 0.1 and rate1 >= 0.8, (rate0, rate1)
    assert torch.equal(logits_of(model, tok, held_out[:6]), before)  # exactly the unsteered model


def test_steering_inside_the_kv_cached_sampler_matches_a_full_forward(tiny):
    """apply_to='all': a greedy KV-cached generation equals argmax of a steered no-cache forward."""
    model, tok = tiny
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size)
    ids = encode_prompts(tok, ["What is 3 + 4?"])
    with add_vector(model, v, [1], coefficient=2.0, apply_to="all"):
        roll = generate(model, ids, SamplingConfig(max_new_tokens=6, temperature=0.0), tok.stop_token_ids,
                        tok.pad_token_id)
        n = int(roll.mask.sum())
        full = torch.tensor([ids[0] + roll.completion_ids[0, :n].tolist()])
        with torch.no_grad():
            logits = model(full)
    assert roll.completion_ids[0, :n].tolist() == logits[0, len(ids[0]) - 1:-1].argmax(-1).tolist()
    plain = generate(model, ids, SamplingConfig(max_new_tokens=6, temperature=0.0), tok.stop_token_ids,
                     tok.pad_token_id)
    assert plain.completion_ids.tolist() != roll.completion_ids.tolist()


def test_steering_keeps_gradients_flowing(tiny):
    model, tok = tiny
    v = torch.zeros(model.config.hidden_size, requires_grad=False)
    ids = torch.tensor(encode_prompts(tok, ["Compute 2 + 2."]))
    with add_vector(model, v, [0]):
        loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_two_vectors_together_have_the_effect_of_their_sum(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    v1, v2 = torch.randn(model.config.hidden_size), torch.randn(model.config.hidden_size)
    texts = ["What is 3 + 4?", "Tell me about baking bread."]
    with Steerer(model) as s:
        h1 = s.add(v1, [2], coefficient=1.5)
        s.add(v2, [2], coefficient=-0.5)
        both = logits_of(model, tok, texts)
        s.remove(h1)
        only2 = logits_of(model, tok, texts)
    with add_vector(model, 1.5 * v1 - 0.5 * v2, [2]):
        summed = logits_of(model, tok, texts)
    with add_vector(model, v2, [2], coefficient=-0.5):
        single = logits_of(model, tok, texts)
    torch.testing.assert_close(both, summed, atol=1e-4, rtol=1e-4)
    assert torch.equal(only2, single)
    assert (both - logits_of(model, tok, texts)).abs().max() > 1e-2  # it did something; and is gone now


# ----------------------------------------------------------------------------- vectors and directions
def test_vector_file_round_trip_with_metadata(tiny, style_vector, tmp_path):
    model, tok = tiny
    sv = SteeringVector.for_model(model, {3: style_vector}, coefficient=1.0, apply_to="prompt",
                                  info={"positions": [-1]})
    path = sv.save(str(tmp_path / "v.safetensors"))
    back = SteeringVector.load(path, model)
    assert (back.layers, back.hidden_size, back.model_type, back.coefficient, back.apply_to, back.info) == \
        ([3], 128, "qwen3", 1.0, "prompt", {"positions": [-1]})
    assert torch.equal(back.vectors[3], style_vector)
    texts = ["What is 3 + 4?"]
    with add_vector(model, back):
        a = logits_of(model, tok, texts)
    with add_vector(model, style_vector, [3], 1.0, "prompt"):
        b = logits_of(model, tok, texts)
    assert torch.equal(a, b)


def test_pca_recovers_a_shared_shift():
    torch.manual_seed(0)
    shift = torch.randn(16)
    neg = torch.randn(1, 50, 1, 16)
    pos = neg + shift + 0.05 * torch.randn(1, 50, 1, 16)
    d = pca_difference(pos, neg)[0]
    assert torch.nn.functional.cosine_similarity(d, shift, dim=0) > 0.99
    torch.testing.assert_close(d.norm(), shift.norm(), rtol=0.05, atol=0)
    torch.testing.assert_close(mean_difference(pos, neg)[0], shift, atol=0.05, rtol=0)


def test_candidate_selection_and_table():
    cands = [Candidate(0, 1.0, rate=0.2, score=-1.0, kl=0.01), Candidate(1, 1.0, rate=0.0, score=-3.0, kl=0.5),
             Candidate(2, 1.0, rate=0.0, score=-2.0, kl=0.02), Candidate(3, 9.0, rate=0.0, score=-9.0, kl=0.0,
                                                                        skipped="last 1 layer(s)")]
    best, note = select(cands, "remove", max_kl=0.1)
    assert best.layer == 2 and note == "" and cands[1].skipped == "kl>0.1"
    assert "*     2" in format_table(cands)
    steer = [Candidate(2, 2.0, 4.0, rate=1.0, score=1.0), Candidate(3, 8.0, 1.0, rate=1.0, score=3.0),
             Candidate(3, 8.0, 0.5, rate=0.5, score=0.0)]
    assert select(steer, "induce")[0] is steer[1]  # same rate, same push (4 x 2 = 1 x 8): the higher score


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt set"):
        capture(model, tok, [])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        load_prompts(str(empty))
    with pytest.raises(ValueError, match=r"layer 4 is out of range: the model has 4 layers \(indices 0..3\)"):
        capture(model, tok, ["hi"], layers=[4])
    with pytest.raises(ValueError, match="out of range"):
        add_vector(model, torch.zeros(128), [7])
    with pytest.raises(ValueError, match="negative offset"):
        capture(model, tok, ["hi"], positions=[0])
    with pytest.raises(ValueError, match="before the start of the shortest prompt"):
        capture(model, tok, ["hi"], positions=[-500])
    with pytest.raises(ValueError, match="pca.*equal size"):
        pca_difference(torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="zero"):
        orthogonalize(copy.deepcopy(model), torch.zeros(128))
    assert check_layers(model, None) == [0, 1, 2, 3]


def test_a_vector_from_a_model_of_another_width_is_refused(tiny, tmp_path):
    model, _ = tiny
    narrow = random_model(hidden=64)
    path = SteeringVector.for_model(narrow, {1: torch.randn(64)}).save(str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="hidden_size 64.*hidden_size is 128"):
        SteeringVector.load(path, model)
    with pytest.raises(ValueError, match="hidden_size is 128"):
        add_vector(model, SteeringVector.load(path), [1])
    with pytest.raises(ValueError, match="hidden_size is 128"):
        add_vector(model, torch.randn(64), [0, 1])
    assert not any(layer._forward_hooks for layer in model.model.layers)  # nothing left half-applied
    with pytest.raises(ValueError, match="hidden_size is 128"):
        ablate_direction(model, torch.randn(64))
    with pytest.raises(ValueError, match="hidden_size is 128"):
        orthogonalize(copy.deepcopy(model), torch.randn(64))
    bad = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, str(bad))
    with pytest.raises(ValueError, match="not a steering vector file"):
        SteeringVector.load(str(bad))


# ----------------------------------------------------------------------------- the run entry points
def _cfg(kind, **over):
    from trainer.config import compose

    return compose([f"method={kind}", *[f"method.{k}={v}".replace(" ", "") for k, v in over.items()]])


def test_run_abliterate_writes_results_direction_and_checkpoint(tiny, tmp_path):
    from evaluation.metrics import Evaluator
    from steering.run import run_abliterate

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    ev = Evaluator(tok, {"harmful": f"{SYN}/harmful_eval.jsonl"}, max_examples=8, max_new_tokens=8)
    res = run_abliterate(_cfg("abliterate", layers=[1, 3], select_prompts=8,
                              select_max_new_tokens=8), model, tok, str(tmp_path), ev)
    assert res["selected"]["layer"] == 1 and res["before"]["refusal_rate"] == 1.0
    assert res["after"]["refusal_rate"] == 0.0 and res["after"]["kl"] <= 0.1 and res["before"]["kl"] == 0.0
    assert [c["layer"] for c in json.loads((tmp_path / "candidates.json").read_text())] == [1, 3]
    assert SteeringVector.load(str(tmp_path / "refusal_direction.safetensors")).kind == "direction"
    loaded, _ = load_model(str(tmp_path / "checkpoints" / "final"), dtype="fp32", device="cpu")
    assert is_refusal(generate_texts(loaded, tok, ["Describe picking locks in detail."], 8)[0]) is False


def test_run_steer_writes_results_and_vector(tiny, tmp_path):
    from evaluation.metrics import Evaluator
    from steering.run import run_steer

    model, tok = tiny
    ev = Evaluator(tok, {"style": f"{SYN}/style_eval.jsonl"}, max_examples=8, max_new_tokens=6)
    res = run_steer(_cfg("steer", layers=[3], coefficient=1.0, max_prompts=32, select_prompts=8, select_max_new_tokens=6),
                    model, tok, str(tmp_path), ev)
    assert res["before"]["style_rate"] == 0.0 and res["after"]["style_rate"] >= 0.8
    assert res["gates"]["style_rate"]["pass"]
    sv = SteeringVector.load(str(tmp_path / "checkpoints" / "final" / "steering_vector.safetensors"), model)
    assert (sv.layers, sv.coefficient, sv.apply_to) == ([3], 1.0, "prompt")


def test_shipped_style_pairs_are_reproducible_and_held_out():
    from steering.pairs import style_pairs

    pairs = style_pairs()
    assert [p for p, _ in pairs] == prompts("style_cue_train")
    assert [p for _, p in pairs] == prompts("style_plain_train")
    assert not set(prompts("style_plain_train")) & set(prompts("style_eval"))
