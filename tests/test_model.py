"""model/: parity with transformers, strict loading, hub cache, dtypes, checkpointing, config, tokenizer.

transformers is the reference here (test-only): a random tiny model of each family is built by
transformers, its weights are perturbed so that norms and biases are not trivially 1 and 0, saved
with `save_pretrained`, loaded by `model.load.load_model`, and the logits must agree to 1e-4 in
fp32. The way back is checked too: our sharded `save_model` output must load in
`AutoModelForCausalLM.from_pretrained` with no missing/unexpected keys and the same logits.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.load import ModelError, load_model, save_model  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.transformer import Transformer, rope_inv_freq  # noqa: E402

VOCAB = 320  # above the 300 tokens of _make_hf_tokenizer: load_model refuses a tokenizer the embedding cannot hold
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

FAMILIES = {
    # Llama 3.x: llama3 RoPE scaling (wavelengths straddle the 16-token original window), untied head
    "llama3_scaled_untied": lambda: LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                                                tie_word_embeddings=False),
    "llama_attention_bias": lambda: LlamaConfig(**TINY, attention_bias=True, tie_word_embeddings=True),
    "qwen2_tied": lambda: Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=True),
    # head_dim 12 != hidden 32 / heads 4
    "qwen3_tied": lambda: Qwen3Config(**TINY, head_dim=12, tie_word_embeddings=True),
    "qwen3_untied": lambda: Qwen3Config(**TINY, head_dim=12, tie_word_embeddings=False),
}


def _hf_checkpoint(directory, family: str, seed: int = 0):
    """A random transformers model of `family`, weights perturbed, saved to `directory`."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(FAMILIES[family]()).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms != 1, biases != 0
    hf.save_pretrained(str(directory))
    return hf


def _batch(seed: int = 1, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # left padding of different lengths, one row unpadded
    mask[1, :1] = 0
    return ids, mask


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return hf(input_ids=ids).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the same positions our forward derives from the mask
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _our_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


# ============================================================================ 1. parity + round trip
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_and_round_trip_with_transformers(tmp_path, family):
    hf = _hf_checkpoint(tmp_path / "hf", family)
    ours, tok = load_model(str(tmp_path / "hf"), dtype="fp32", device="cpu", with_tokenizer=False)
    assert tok is None and not ours.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in ours.parameters())

    # the key set is exactly what transformers writes (tied: no lm_head.weight)
    hf_keys = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert set(ours.state_dict()) == hf_keys
    tied = hf.config.tie_word_embeddings
    assert ("lm_head.weight" in hf_keys) == (not tied)
    if family == "llama_attention_bias":
        assert "model.layers.0.self_attn.o_proj.bias" in hf_keys
    if family.startswith("qwen2"):
        assert "model.layers.0.self_attn.q_proj.bias" in hf_keys
        assert "model.layers.0.self_attn.o_proj.bias" not in hf_keys
    if family.startswith("qwen3"):
        assert ours.model.layers[0].self_attn.q_norm.weight.shape == (12,)

    ids, mask = _batch()
    ref, got = _hf_logits(hf, ids), _our_logits(ours, ids)
    assert ref.abs().max() > 0.1  # not a degenerate model
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    real = mask.bool()
    ref_m, got_m = _hf_logits(hf, ids, mask), _our_logits(ours, ids, mask)
    assert torch.isfinite(got_m).all()
    torch.testing.assert_close(got_m[real], ref_m[real], atol=1e-4, rtol=1e-4)
    # a left-padded row's real positions see exactly what the unpadded suffix sees
    torch.testing.assert_close(got_m[0, 4:], _our_logits(ours, ids[:1, 4:])[0], atol=1e-4, rtol=1e-4)

    # ours -> transformers, forced into shards
    out = save_model(ours, str(tmp_path / "ours"), max_shard_bytes=8 * 1024)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    assert set(index["weight_map"]) == hf_keys
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(out + ".tmp")
    back, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.config.tie_word_embeddings == tied
    torch.testing.assert_close(_hf_logits(back, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_hf_logits(back, ids, mask)[real], ref_m[real], atol=1e-4, rtol=1e-4)

    # and our own sharded output loads back in ours
    again, _ = load_model(out, dtype="fp32", device="cpu", with_tokenizer=False)
    torch.testing.assert_close(_our_logits(again, ids), got, atol=0, rtol=0)


def test_save_model_overwrites_an_existing_checkpoint_whole(tmp_path):
    _hf_checkpoint(tmp_path / "hf", "qwen3_tied")
    model, _ = load_model(str(tmp_path / "hf"), dtype="fp32", device="cpu", with_tokenizer=False)
    target = str(tmp_path / "ckpt")
    save_model(model, target, max_shard_bytes=8 * 1024)  # sharded first
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    save_model(model, target)  # then one file: no stale shards or index may survive
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not os.path.exists(target + ".old") and not os.path.exists(target + ".tmp")
    again, _ = load_model(target, dtype="fp32", device="cpu", with_tokenizer=False)
    torch.testing.assert_close(again.model.norm.weight, model.model.norm.weight)


# ============================================================================ 2. strictness
def _tamper(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    fn(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("tamper, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "no tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)),
     "tensor 'model.layers.0.self_attn.extra.weight' is not part of the model"),
    (lambda s: s.__setitem__("model.norm.weight", torch.ones(33)), r"'model.norm.weight' has shape \[33\].*\[32\]"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(32, 32)),
     r"has shape \[32, 32\], but .*config.json \(num_key_value_heads=2, head_dim=8, hidden_size=32\) describes "
     r"shape \[16, 32\]"),
])
def test_checkpoint_that_does_not_match_fails_to_load(tmp_path, tamper, message):
    _hf_checkpoint(tmp_path, "qwen2_tied")
    load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)  # loads before tampering
    _tamper(str(tmp_path), tamper)
    with pytest.raises(ModelError, match=message) as e:
        load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    assert str(e.value).startswith(str(tmp_path / "model.safetensors")) and "\n" not in str(e.value)


def test_config_of_another_size_fails_to_load(tmp_path):
    _hf_checkpoint(tmp_path, "qwen3_untied")
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["num_hidden_layers"] = 3
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ModelError, match="config.json: field 'num_hidden_layers' is 3, but .*model.safetensors "
                                         "holds 2 layers"):
        load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)


def test_tied_checkpoint_carrying_an_lm_head_copy_still_loads(tmp_path):
    hf = _hf_checkpoint(tmp_path, "qwen2_tied")
    _tamper(str(tmp_path), lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone()))
    ours, _ = load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    ids, _ = _batch()
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_directory_without_weights_or_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    _hf_checkpoint(tmp_path, "qwen2_tied")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)


# ============================================================================ 7. tokenizer (fixtures used by 3.)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's template shape: dash-trimmed tags, a default system prompt, tools through tojson
QWEN_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Undashed block tags: the output depends on trim_blocks + lstrip_blocks exactly as transformers sets them
PLAIN_TEMPLATE = """{% set ns = namespace(turns=0) %}
{% for m in messages %}
    {% if m['role'] == 'assistant' %}
        {% set ns.turns = ns.turns + 1 %}
<|im_start|>assistant
{{ m['content'] }}{{ eos_token }}
    {% else %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "  And 4 + 4?\n"},
    {"role": "assistant", "content": "8, naïvely \"eight\"."},
    {"role": "user", "content": "Thanks!"},
]


def _make_hf_tokenizer(directory, template: str):
    """A tiny byte-level BPE wrapped in transformers' fast tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for m in CONVERSATION] + ["system user assistant", "You are a helpful assistant."] * 3
    raw.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     additional_special_tokens=["<|im_start|>"], chat_template=template)
    hf_tok.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("template", [QWEN_TEMPLATE, PLAIN_TEMPLATE], ids=["qwen", "plain"])
def test_chat_template_and_special_tokens_match_transformers(tmp_path, template):
    hf_tok = _make_hf_tokenizer(tmp_path, template)
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.eos_token_id == hf_tok.eos_token_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == hf_tok.pad_token_id == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id in tok.stop_token_ids

    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:3]):
        for gen in (False, True):
            ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            text = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == ref
            ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            assert ids == hf_tok.encode(ref, add_special_tokens=False)
            assert tok.decode(ids, skip_special_tokens=False) == ref
            assert text.endswith("<|im_start|>assistant\n") == gen
    if template is QWEN_TEMPLATE:
        # no system message: the template's default one; tools go through tojson as transformers renders them
        tools = [{"type": "function", "function": {"name": "add", "description": "a + b <é>",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        assert "You are a helpful assistant." in tok.apply_chat_template(CONVERSATION[1:])
        ref = hf_tok.apply_chat_template(CONVERSATION, tools=tools, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(CONVERSATION, tools=tools, add_generation_prompt=True) == ref
        assert '"a + b <é>"' in ref


def test_tokenizer_round_trips_through_our_save(tmp_path):
    hf_tok = _make_hf_tokenizer(tmp_path / "hf", QWEN_TEMPLATE)
    tok = Tokenizer.from_dir(str(tmp_path / "hf"))
    tok.save(str(tmp_path / "ours"))
    again = Tokenizer.from_dir(str(tmp_path / "ours"))
    hf_again = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    for t in (again, hf_again):
        assert t.eos_token_id == hf_tok.eos_token_id and t.pad_token_id == hf_tok.pad_token_id
    ref = hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert again.apply_chat_template(CONVERSATION, add_generation_prompt=True) == ref
    assert hf_again.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == ref


def test_save_model_with_tokenizer_is_a_complete_hf_directory(tmp_path):
    hf = _hf_checkpoint(tmp_path / "src", "qwen3_untied")
    hf_tok = _make_hf_tokenizer(tmp_path / "src", QWEN_TEMPLATE)
    model, tok = load_model(str(tmp_path / "src"), dtype="fp32", device="cpu")
    out = save_model(model, str(tmp_path / "out"), tokenizer=tok)
    back_tok = AutoTokenizer.from_pretrained(out)
    assert back_tok.eos_token_id == hf_tok.eos_token_id and back_tok.pad_token_id == hf_tok.pad_token_id
    ref = hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert back_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == ref
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == hf.config.eos_token_id
    model2, tok2 = load_model(out, dtype="fp32", device="cpu")
    assert tok2.apply_chat_template(CONVERSATION, add_generation_prompt=True) == ref
    ids, _ = _batch()
    torch.testing.assert_close(_our_logits(model2, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_tokenizer_dir_without_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))


# ============================================================================ 3. hub cache
def _hub_cache(root, repo_id: str, source_dir) -> tuple[str, str]:
    """Lay `source_dir` out as huggingface_hub's cache does: blobs/<sha256>, snapshots/<commit>/ links, refs/main."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "refs"))
    os.makedirs(snap)
    for name in os.listdir(source_dir):
        data = open(os.path.join(source_dir, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snap, commit


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once, when it is
    imported (huggingface_hub.constants), so setting the variables alone is not seen by an imported
    library: the constants are patched too."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_the_cache_offline(tmp_path, offline_hub_cache):
    src = tmp_path / "src"
    hf = _hf_checkpoint(src, "qwen2_tied")
    hf_tok = _make_hf_tokenizer(src, QWEN_TEMPLATE)
    snap, commit = _hub_cache(str(offline_hub_cache), "org/name", str(src))

    model, tok = load_model("org/name", dtype="fp32", device="cpu")
    ids, mask = _batch()
    torch.testing.assert_close(_our_logits(model, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    assert tok is not None and tok.eos_token_id == hf_tok.eos_token_id
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    from model.hub import resolve_model_dir
    assert os.path.realpath(resolve_model_dir("org/name")) == os.path.realpath(snap)
    assert commit in resolve_model_dir("org/name")


def test_missing_hub_id_names_the_id(offline_hub_cache):
    with pytest.raises(FileNotFoundError, match="org/does-not-exist"):
        load_model("org/does-not-exist", dtype="fp32", device="cpu")


@pytest.mark.parametrize("path", ["./nope", "nope", "/definitely/not/here", "a/b/c"])
def test_missing_directory_is_a_clear_error(path, offline_hub_cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory") as e:
        load_model(path, dtype="fp32", device="cpu")
    assert path in str(e.value)


def test_hub_id_loads_even_after_a_caller_prefixed_the_repository_root(tmp_path, offline_hub_cache, monkeypatch):
    """`model=qwen3-0.6b` gives `Qwen/Qwen3-0.6B`; train.py's repo_path() turned it into `<repo>/Qwen/Qwen3-0.6B`,
    which is no directory, and the loader refused it. The loader now reads both forms as the hub id, and a
    repo-relative directory from any working directory."""
    from model.hub import REPO, local_or_hub

    src = tmp_path / "src"
    hf = _hf_checkpoint(src, "qwen3_tied")
    _hub_cache(str(offline_hub_cache), "Qwen/Tiny-Test", str(src))
    monkeypatch.chdir(tmp_path)
    ids, _ = _batch()
    for given in ("Qwen/Tiny-Test", os.path.join(REPO, "Qwen", "Tiny-Test")):
        assert local_or_hub(given) == (None, "Qwen/Tiny-Test")
        model, _ = load_model(given, dtype="fp32", device="cpu", with_tokenizer=False)
        torch.testing.assert_close(_our_logits(model, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    # a directory relative to the repository root, from a working directory that does not have it
    assert local_or_hub("assets/tiny-qwen3") == (os.path.join(REPO, "assets", "tiny-qwen3"), None)
    model, tok = load_model("assets/tiny-qwen3", dtype="fp32", device="cpu")
    assert tok.eos_token_id is not None
    # a directory of the working directory wins over the hub id of the same name
    (tmp_path / "Qwen").mkdir()
    os.symlink(src, tmp_path / "Qwen" / "Tiny-Test")
    assert local_or_hub("Qwen/Tiny-Test") == ("Qwen/Tiny-Test", None)


# ============================================================================ 4. dtype
def test_bf16_load_is_close_to_fp32_and_bad_dtype_is_named(tmp_path):
    _hf_checkpoint(tmp_path, "llama3_scaled_untied")
    m32, _ = load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    m16, _ = load_model(str(tmp_path), dtype="bf16", device="cpu", with_tokenizer=False)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert m16.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as HF keeps them
    ids, mask = _batch()
    l32, l16 = _our_logits(m32, ids, mask), _our_logits(m16, ids, mask)
    assert l16.dtype == torch.bfloat16 and torch.isfinite(l16).all()
    err = (l16.float() - l32).abs().max() / l32.abs().max()
    assert err < 0.05, err
    assert (l16.float().argmax(-1) == l32.argmax(-1)).float().mean() > 0.8
    # saved in bf16, the config says so under both names, so transformers' dtype="auto" loads bf16
    out = save_model(m16, str(tmp_path / "bf16"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    hf16 = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert hf16.dtype == torch.bfloat16
    torch.testing.assert_close(_hf_logits(hf16, ids).float(), _our_logits(m16, ids).float(), atol=0.05, rtol=0.02)
    m, _ = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu", with_tokenizer=False)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    for bad in ("fp8", "int8", "float64"):
        with pytest.raises(ValueError, match=bad):
            load_model(str(tmp_path), dtype=bad, device="cpu", with_tokenizer=False)


# ============================================================================ 5. gradient checkpointing
@pytest.mark.parametrize("use_mask", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(use_mask):
    torch.manual_seed(0)
    config = ModelConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                         tie_word_embeddings=False)
    model = Transformer(config).train()
    ids, mask = _batch()
    calls = []
    for layer in model.model.layers:
        # a pre-hook: the recomputation stops early (after the last saved tensor), so a post-hook may not fire
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_grads(ckpt: bool):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        calls.clear()
        logits = model(ids, attention_mask=mask if use_mask else None)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss0, grads0, calls0 = loss_and_grads(False)
    loss1, grads1, calls1 = loss_and_grads(True)
    assert calls0 == 3 and calls1 == 6  # checkpointing really recomputes every layer in backward
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(g.abs().sum() > 0 for g in grads0.values())

    # eval / no-grad: no recomputation and no checkpoint warnings
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert len(calls) == 3


# ============================================================================ 6. config.json
def test_rope_parameters_and_rope_scaling_parse_alike():
    v5 = LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)).to_dict()
    assert "rope_parameters" in v5  # transformers 5 layout
    hub = {k: v for k, v in v5.items() if k != "rope_parameters"}
    hub.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))  # Llama 3.x hub layout
    a, b = ModelConfig.from_hf(v5), ModelConfig.from_hf(hub)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling == b.rope_scaling
    assert a.rope_scaling["rope_type"] == "llama3" and a.rope_scaling["factor"] == 8.0
    torch.testing.assert_close(rope_inv_freq(a), rope_inv_freq(b), atol=0, rtol=0)
    assert not torch.equal(rope_inv_freq(a), rope_inv_freq(ModelConfig.from_hf({**hub, "rope_scaling": None})))
    # what we write back parses to the same thing, and transformers reads it as the same rope
    c = ModelConfig.from_hf(a.to_hf())
    assert (c.rope_theta, c.rope_scaling) == (a.rope_theta, a.rope_scaling)
    assert LlamaConfig(**a.to_hf()).rope_parameters == v5["rope_parameters"]
    # default rope: transformers 5 dict vs hub dict
    q5 = Qwen3Config(**TINY, rope_theta=1000000.0).to_dict()
    qhub = {**{k: v for k, v in q5.items() if k != "rope_parameters"}, "rope_theta": 1000000.0, "rope_scaling": None}
    for d in (q5, qhub):
        c = ModelConfig.from_hf(d)
        assert c.rope_theta == 1000000.0 and c.rope_scaling is None and c.head_dim == q5["head_dim"]


def test_unsupported_or_missing_model_type_is_a_clear_error(tmp_path):
    d = LlamaConfig(**TINY).to_dict()
    with pytest.raises(ValueError, match="mistral"):
        ModelConfig.from_hf({**d, "model_type": "mistral"})
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({k: v for k, v in d.items() if k != "model_type"})
    _hf_checkpoint(tmp_path, "qwen2_tied")
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "model_type": "gemma"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="gemma"):
        load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2",\n  oops}')
    with pytest.raises(ValueError, match="config.json:2"):
        load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)


def test_config_json_as_the_hub_carries_it(tmp_path):
    """A config.json in the classic hub layout (what Llama 3.x / Qwen2.5 repos ship) loads in both."""
    _hf_checkpoint(tmp_path, "llama3_scaled_untied")
    cfg = json.load(open(tmp_path / "config.json"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    ours, _ = load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids, _ = _batch()
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


# ============================================================================ 8. sliding-window attention
SLIDING = {
    # Qwen2 hub layout: layers from max_window_layers on slide (layer 1 of 2), window 4 < the 11-token batch
    "qwen2_window": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                        tie_word_embeddings=True),
    # Qwen3 with explicit layer_types: the first layer slides, the second does not
    "qwen3_layer_types": lambda: Qwen3Config(**TINY, head_dim=12, use_sliding_window=True, sliding_window=3,
                                             layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_matches_transformers(tmp_path, family):
    """A Qwen2/Qwen3 config with use_sliding_window loaded and silently ran full attention (logits 0.1-0.5 off).
    The window now holds on every path: causal, left-padded, KV cache (prefill + decode), packed documents."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(SLIDING[family]()).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path))
    ours, _ = load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    assert ours.sliding == [t == "sliding_attention" for t in hf.config.layer_types] and any(ours.sliding)
    ids, mask = _batch()
    ref = _hf_logits(hf, ids)
    torch.testing.assert_close(_our_logits(ours, ids), ref, atol=1e-4, rtol=1e-4)
    # left padding (the sampler's prompts)
    real = mask.bool()
    torch.testing.assert_close(_our_logits(ours, ids, mask)[real], _hf_logits(hf, ids, mask)[real],
                               atol=1e-4, rtol=1e-4)
    # KV cache: prefill 5 tokens of the left-padded batch, then decode the rest one token at a time
    from model.transformer import KVCache

    cache = KVCache(ours.config, ids.shape[0], ids.shape[1], "cpu", torch.float32)
    with torch.no_grad():
        steps = [ours(ids[:, :5], attention_mask=mask[:, :5], cache=cache, cache_pos=0)]
        for t in range(5, ids.shape[1]):
            steps.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, cache_pos=t))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[real], _hf_logits(hf, ids, mask)[real], atol=1e-4, rtol=1e-4)
    # packed documents: each example computes what it computes alone
    a, b = ids[2, :7], ids[1, :6]
    with torch.no_grad():
        packed = ours(torch.cat([a, b])[None], document_ids=torch.tensor([[0] * 7 + [1] * 6]))
    torch.testing.assert_close(packed[0, :7], _hf_logits(hf, a[None])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[0, 7:], _hf_logits(hf, b[None])[0], atol=1e-4, rtol=1e-4)
    # and the window matters here: full attention gives other logits
    no_window = Transformer(ModelConfig.from_hf(hf.config.to_dict() | {"use_sliding_window": False}))
    no_window.load_state_dict(ours.state_dict())
    assert (_our_logits(no_window, ids) - ref).abs().max() > 1e-2


def test_sliding_window_wider_than_the_sequence_changes_nothing(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=32, max_window_layers=0)
    model = Transformer(ModelConfig.from_hf(cfg.to_dict())).eval()
    full = Transformer(ModelConfig.from_hf(cfg.to_dict() | {"use_sliding_window": False})).eval()
    full.load_state_dict(model.state_dict())
    ids, mask = _batch()
    assert all(model.sliding) and not any(full.sliding)
    torch.testing.assert_close(_our_logits(model, ids, mask), _our_logits(full, ids, mask), atol=0, rtol=0)
