"""Tests for rollout/sampler.py on a random tiny Qwen3-shaped Transformer (CPU, fp32)."""
import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.transformer import Transformer
from rollout.sampler import SamplingConfig, filter_logits, generate

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], list(range(20, 32))]  # lengths 3, 7, 12
PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = Transformer(cfg)
    with torch.no_grad():  # sharpen the random model so greedy outputs vary instead of copying the last token
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(0.5 if "embed" in name else 4.0)
    return m.eval()


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def completions(r):
    """Per row, the tokens under the mask."""
    return [[t for t, m in zip(ids, ms) if m] for ids, ms in zip(r.completion_ids.tolist(), r.mask.tolist())]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_matches_naive_decoding(model, num_samples):
    r = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), [], PAD, num_samples=num_samples)
    assert r.completion_ids.shape == (len(PROMPTS) * num_samples, 10)
    assert r.prompt_ids == PROMPTS
    for i, p in enumerate(PROMPTS):
        ref = naive_greedy(model, p, 10)
        assert len(set(ref)) > 2  # the test model is not degenerate
        for j in range(num_samples):
            assert r.completion_ids[i * num_samples + j].tolist() == ref
    assert r.mask.eq(1).all() and r.truncated.all()


def test_seed_reproducible(model):
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0)
    a = generate(model, PROMPTS, cfg, [], PAD, num_samples=2, seed=1)
    b = generate(model, PROMPTS, cfg, [], PAD, num_samples=2, seed=1)
    c = generate(model, PROMPTS, cfg, [], PAD, num_samples=2, seed=2)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 0.9), (0.7, 8, 0.8)])
def test_logprobs_match_training_forward(model, temperature, top_k, top_p):
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p)
    r = generate(model, PROMPTS, cfg, [7], PAD, num_samples=2, seed=3)
    for row, comp in enumerate(completions(r)):
        prompt = PROMPTS[row // 2]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + comp]))[0, len(prompt) - 1:-1]
        ref = F.log_softmax(logits.float() / temperature, -1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
        # fp32: the cached decode and the full forward sum in different orders (seen: 1.3e-5 on a
        # log-prob of -4.2 with AVX-512), so the bound is relative as well as absolute
        torch.testing.assert_close(r.logprobs[row, :len(comp)], ref, atol=1e-5, rtol=1e-5)
        assert r.logprobs[row, len(comp):].eq(0).all()
    assert r.logprobs.dtype == torch.float32


def test_eos_stops_row(model):
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), [], PAD)
    row0 = greedy.completion_ids[0].tolist()
    eos = row0[3]
    first = row0.index(eos)
    r = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), [eos], PAD)
    assert r.completion_ids[0, :first + 1].tolist() == row0[:first + 1]
    assert r.mask[0, :first + 1].eq(1).all() and r.mask[0, first + 1:].eq(0).all()
    assert r.completion_ids[0, first + 1:].eq(PAD).all() and r.logprobs[0, first + 1:].eq(0).all()
    assert not r.truncated[0]
    for row in (1, 2):  # the other rows: truncated exactly when eos never came
        ids = greedy.completion_ids[row].tolist()
        assert bool(r.truncated[row]) == (eos not in ids)


def test_stops_early_when_all_rows_finish(model):
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), [], PAD)
    firsts = greedy.completion_ids[:, 0].tolist()
    r = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), firsts, PAD)
    assert r.completion_ids.shape == (3, 1) and not r.truncated.any()


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_equal_greedy(model, kw):
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), [], PAD)
    r = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.3, **kw), [], PAD, seed=0)
    assert torch.equal(r.completion_ids, greedy.completion_ids)


def test_filter_logits_compose():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.65) == [True, True, False, False, False]  # 0.4 + 0.3 >= 0.65
    assert keep(top_p=0.75) == [True, True, True, False, False]
    assert keep(top_p=1e-6) == [True, False, False, False, False]  # always at least one token
    assert keep(min_p=0.45) == [True, True, True, False, False]  # p >= 0.18
    assert keep(top_k=3, top_p=0.75) == [True, True, False, False, False]  # renormalised after top-k: 0.7/0.9 >= 0.75
    assert keep(top_k=3, min_p=0.6) == [True, True, False, False, False]


def _word_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from model.tokenizer import Tokenizer
    backend = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["w0"])
    return Tokenizer(backend=backend, eos_token="w0", pad_token="w0")


def test_stop_strings_end_a_row(model):
    tok = _word_tokenizer()
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), [], PAD)
    row0 = greedy.completion_ids[0].tolist()
    stop = tok.decode(row0[2:4]) + " "  # two words and a space: completes with the token after them
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, stop_strings=(stop,))
    r = generate(model, PROMPTS, cfg, [], PAD, tokenizer=tok)
    for row, comp in enumerate(completions(r)):
        ids = greedy.completion_ids[row].tolist()
        # reference: the first prefix whose decoded text contains the stop string
        end = next((t + 1 for t in range(len(ids)) if stop in tok.decode(ids[:t + 1])), None)
        assert comp == ids[:end or len(ids)]
        assert bool(r.truncated[row]) == (end is None)
    assert r.completion_ids[0, len(completions(r)[0]):].eq(PAD).all()
    texts = r.texts(tok)
    full = tok.decode(row0)
    assert texts[0] == full[:full.index(stop)] and stop not in texts[0]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPTS, cfg, [], PAD)


def test_prefill_runs_once_per_prompt(model):
    shapes = []
    forward = model.forward

    def spy(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    model.forward = spy
    try:
        r = generate(model, PROMPTS, SamplingConfig(max_new_tokens=5), [], PAD, num_samples=4, seed=0)
    finally:
        del model.forward
    assert shapes[0] == (3, 12)  # B rows at prefill, not B * num_samples
    assert shapes[1:] == [(12, 1)] * 4  # then one token per step for all 12 rows
    assert r.completion_ids.shape == (12, 5)


def test_restores_training_flag_and_bf16(model):
    m = Transformer(model.config)
    m.load_state_dict(model.state_dict())
    m.to(torch.bfloat16).train()
    r = generate(m, PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0.8, top_p=0.9), [], PAD, num_samples=2,
                 seed=0)
    assert m.training and r.completion_ids.shape == (6, 4) and r.logprobs.dtype == torch.float32
    assert torch.isfinite(r.logprobs).all() and (r.logprobs <= 0).all()


# ----------------------------------------------------------------------------- geometric mixture (Nash-MD)
@pytest.fixture(scope="module")
def other(model):
    """A second model with the same vocabulary (different weights): the 'reference' of the mixture."""
    torch.manual_seed(1)
    m = Transformer(model.config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(0.5 if "embed" in name else 4.0)
    return m.eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0])
def test_mixture_endpoints_equal_policy_and_reference(model, other, temperature):
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature)
    policy = generate(model, PROMPTS, cfg, [], PAD, num_samples=3, seed=5)
    ref = generate(other, PROMPTS, cfg, [], PAD, num_samples=3, seed=5)
    assert not torch.equal(policy.completion_ids, ref.completion_ids)  # the two models do differ
    at0 = generate(model, PROMPTS, cfg, [], PAD, num_samples=3, seed=5, mixture_model=other, mixture_coef=0.0)
    at1 = generate(model, PROMPTS, cfg, [], PAD, num_samples=3, seed=5, mixture_model=other, mixture_coef=1.0)
    assert torch.equal(at0.completion_ids, policy.completion_ids)
    assert torch.equal(at1.completion_ids, ref.completion_ids)
    torch.testing.assert_close(at0.logprobs, policy.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(at1.logprobs, ref.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coef", [0.3, 0.5])
def test_mixture_draws_from_mixture_logits_at_every_step(model, other, coef):
    """The log-prob the sampler reports for each drawn token equals mixture_logits of full (no-cache)
    forwards of both models on prompt + completion so far: the per-step distribution is the mixture."""
    from losses.nash_md import mixture_logits

    r = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12), [7], PAD, num_samples=2, seed=3,
                 mixture_model=other, mixture_coef=coef)
    plain = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12), [7], PAD, num_samples=2, seed=3)
    assert not torch.equal(r.completion_ids, plain.completion_ids)
    for row, comp in enumerate(completions(r)):
        prompt = PROMPTS[row // 2]
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            mix = mixture_logits(model(ids)[0, len(prompt) - 1:-1], other(ids)[0, len(prompt) - 1:-1], coef)
        ref = mix.gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
        torch.testing.assert_close(r.logprobs[row, :len(comp)], ref, atol=1e-5, rtol=0)
    # greedy on the mixture: argmax of mixture_logits, step by step, without a cache
    g = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0), [], PAD, mixture_model=other,
                 mixture_coef=coef)
    for i, p in enumerate(PROMPTS):
        ids = list(p)
        with torch.no_grad():
            for _ in range(8):
                t = torch.tensor([ids])
                ids.append(int(mixture_logits(model(t)[0, -1], other(t)[0, -1], coef).argmax()))
        assert g.completion_ids[i].tolist() == ids[len(p):]


def test_mixture_prefills_each_model_once_and_restores_flags(model, other):
    calls = {id(model): [], id(other): []}
    for m in (model, other):
        m.forward = (lambda fwd, log: lambda input_ids, *a, **k: (log.append(tuple(input_ids.shape)),
                                                                   fwd(input_ids, *a, **k))[1])(m.forward, calls[id(m)])
    other.train()
    try:
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=4), [], PAD, num_samples=2, seed=0,
                 mixture_model=other)
    finally:
        del model.forward, other.forward
    assert calls[id(model)] == calls[id(other)] == [(3, 12)] + [(6, 1)] * 3
    assert other.training and not model.training
    other.eval()
    bad = Transformer(ModelConfig(model_type="qwen3", vocab_size=32, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=4), [], PAD, mixture_model=bad)
