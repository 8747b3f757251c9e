"""model/: a defective model directory is one ModelError whose one-line message names the file.

Each case copies assets/tiny-qwen3 (symlinks to the untouched files, the defective file written
fresh), breaks one thing, and asserts that load_model raises ModelError (a ValueError; a missing
file is MissingModelFile, also a FileNotFoundError) with a one-line message naming the broken file
and what was expected. The listed cases are the reported ones; the fuzz test then breaks the same
files in many seeded random ways and allows exactly two outcomes: that error naming the file, or a
load whose model really matches its config (forward pass of the right shape, every token id inside
the embedding). Device names go through resolve_device, a ValueError of their own.
"""
from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.load import MissingModelFile, ModelError, load_model, resolve_device, save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(REPO, "assets", "tiny-qwen3")
WEIGHTS = "model.safetensors"


def _copy(root, name="m"):
    """A model directory whose files are links to the asset's (replace one with _write before breaking it)."""
    d = os.path.join(str(root), name)
    os.makedirs(d)
    for f in os.listdir(ASSET):
        os.symlink(os.path.join(ASSET, f), os.path.join(d, f))
    return d


def _write(d, name, data) -> None:
    path = os.path.join(d, name)
    if os.path.lexists(path):
        os.unlink(path)
    if isinstance(data, (dict, list)) or data is None or isinstance(data, (int, float)):
        data = json.dumps(data)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _asset_json(name):
    with open(os.path.join(ASSET, name), encoding="utf-8") as f:
        return json.load(f)


def _asset_bytes(name) -> bytes:
    with open(os.path.join(ASSET, name), "rb") as f:
        return f.read()


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _config(**changes):
    return lambda d: _write(d, "config.json", {**_asset_json("config.json"), **changes})


def _tok_config(**changes):
    return lambda d: _write(d, "tokenizer_config.json", {**_asset_json("tokenizer_config.json"), **changes})


def _state(fn):
    def mutate(d):
        state = load_file(os.path.join(ASSET, WEIGHTS))
        fn(state)
        path = os.path.join(d, WEIGHTS)
        os.unlink(path)
        save_file(state, path, metadata={"format": "pt"})
    return mutate


def _sharded(fn=None):
    """The asset re-saved as shards + index, then `fn(directory, index dict)` edits (and writes) the index."""
    def mutate(d):
        model, tok = load_model(ASSET, dtype="fp32", device="cpu")
        out = save_model(model, d + ".sharded", tokenizer=tok, max_shard_bytes=512 * 1024)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)
        os.rename(out, d)
        if fn is not None:
            with open(os.path.join(d, "model.safetensors.index.json")) as f:
                fn(d, json.load(f))
    return mutate


def _index(edit):
    def fn(d, index):
        edit(d, index)
        _write(d, "model.safetensors.index.json", index)
    return _sharded(fn)


def _vocab_600(d):
    """Config and embedding shrunk to 600 rows: weights agree with config.json, the 649-token tokenizer does not."""
    _config(vocab_size=600)(d)
    _state(lambda s: s.__setitem__("model.embed_tokens.weight", s["model.embed_tokens.weight"][:600].clone()))(d)


def _header_edit(edit):
    def mutate(d):
        header, data = _split(_asset_bytes(WEIGHTS))
        edit(header)
        _write(d, WEIGHTS, _join(header, data))
    return mutate


INDEX = "model.safetensors.index.json"
STM = "special_tokens_map.json"
BROKEN = [
    # weights
    ("truncated", lambda d: _write(d, WEIGHTS, _asset_bytes(WEIGHTS)[:1_000_000]), WEIGHTS, "safetensors"),
    ("empty", lambda d: _write(d, WEIGHTS, b""), WEIGHTS, "safetensors"),
    ("garbage", lambda d: _write(d, WEIGHTS, random.Random(0).randbytes(4096)), WEIGHTS, "safetensors"),
    ("huge_header", lambda d: _write(d, WEIGHTS, struct.pack("<Q", 2**40) + _asset_bytes(WEIGHTS)[8:]), WEIGHTS,
     "safetensors"),
    ("header_not_json", lambda d: _write(d, WEIGHTS, struct.pack("<Q", 6) + b"{nope}" + b"\0" * 64), WEIGHTS,
     "safetensors"),
    ("missing_tensor", _state(lambda s: s.pop("model.layers.3.mlp.up_proj.weight")), WEIGHTS,
     "no tensor 'model.layers.3.mlp.up_proj.weight'"),
    ("extra_tensor", _state(lambda s: s.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(3))), WEIGHTS,
     "'model.layers.0.mlp.extra.weight' is not part of the model"),
    ("wrong_shape", _state(lambda s: s.__setitem__("model.norm.weight", torch.ones(129))), WEIGHTS,
     "has shape [129]"),
    ("int_tensor", _state(lambda s: s.__setitem__("model.norm.weight", torch.ones(128, dtype=torch.int64))),
     WEIGHTS, "dtype I64"),
    ("unknown_dtype", _header_edit(lambda h: h["model.norm.weight"].__setitem__("dtype", "F33")), WEIGHTS,
     "safetensors"),
    ("offsets_past_end", _header_edit(lambda h: h["model.norm.weight"].__setitem__("data_offsets", [0, 10**9])),
     WEIGHTS, "safetensors"),
    # config.json against the weights
    ("more_layers", _config(num_hidden_layers=5), "config.json", "num_hidden_layers' is 5, but"),
    ("fewer_layers", _config(num_hidden_layers=2), "config.json", "holds 4 layers"),
    ("vocab", _config(vocab_size=700), "config.json", "vocab_size=700"),
    ("heads", _config(num_attention_heads=8, num_key_value_heads=4), "config.json", "num_attention_heads=8"),
    ("untied", _config(tie_word_embeddings=False), "config.json", "no tensor 'lm_head.weight'"),
    # config.json values
    ("config_list", lambda d: _write(d, "config.json", [_asset_json("config.json")]), "config.json",
     "expected a JSON object"),
    ("config_not_json", lambda d: _write(d, "config.json", '{"model_type": "qwen3",\n oops'), "config.json:2",
     "not valid JSON"),
    ("config_not_utf8", lambda d: _write(d, "config.json", b'{"model_type": "\xff"}'), "config.json", "UTF-8"),
    ("hidden_size_str", _config(hidden_size="128"), "config.json", "field 'hidden_size': expected a positive integer"),
    ("kv_heads_zero", _config(num_key_value_heads=0), "config.json", "field 'num_key_value_heads'"),
    ("kv_heads_3", _config(num_key_value_heads=3), "config.json", "a divisor of num_attention_heads=4"),
    ("layers_float", _config(num_hidden_layers=4.0), "config.json", "field 'num_hidden_layers'"),
    ("layers_bool", _config(num_hidden_layers=True), "config.json", "field 'num_hidden_layers'"),
    ("no_hidden_size", lambda d: _write(d, "config.json", {k: v for k, v in _asset_json("config.json").items()
                                                          if k != "hidden_size"}), "config.json", "'hidden_size'"),
    ("rope_theta_str", _config(rope_theta="abc"), "config.json", "field 'rope_theta': expected a positive number"),
    ("rope_theta_nan", lambda d: _write(d, "config.json", json.dumps({**_asset_json("config.json"),
                                                                      "rope_theta": float("nan")})),
     "config.json", "rope_theta"),
    ("rope_yarn", _config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "config.json", "rope_type"),
    ("rope_llama3_partial", _config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "config.json",
     "low_freq_factor"),
    ("rope_scaling_str", _config(rope_scaling="llama3"), "config.json", "rope_scaling"),
    ("rms_eps_str", _config(rms_norm_eps="1e-6"), "config.json", "rms_norm_eps"),
    ("tie_str", _config(tie_word_embeddings="yes"), "config.json", "field 'tie_word_embeddings': expected true or"),
    ("gelu", _config(hidden_act="gelu"), "config.json", "hidden_act"),
    ("model_type", _config(model_type="gemma"), "config.json", "gemma"),
    ("eos_beyond_vocab", _config(eos_token_id=10**6), "config.json", "eos_token_id"),
    ("eos_str", _config(eos_token_id="<|im_end|>"), "config.json", "eos_token_id"),
    ("head_dim_odd", _config(head_dim=31), "config.json", "head_dim"),
    ("layer_types", _config(use_sliding_window=True, sliding_window=64, layer_types=["full_attention"] * 3),
     "config.json", "layer_types"),
    ("sliding_window_str", _config(use_sliding_window=True, sliding_window="64"), "config.json", "sliding_window"),
    # tokenizer files
    ("tokenizer_not_json", lambda d: _write(d, "tokenizer.json", "{not json"), "tokenizer.json", "tokenizers library"),
    ("tokenizer_wrong_json", lambda d: _write(d, "tokenizer.json", {"model": 3}), "tokenizer.json",
     "tokenizers library"),
    ("tokenizer_truncated", lambda d: _write(d, "tokenizer.json", _asset_bytes("tokenizer.json")[:5000]),
     "tokenizer.json", "tokenizers library"),
    ("tokenizer_beyond_vocab", _vocab_600, "tokenizer.json", "vocab_size=600"),
    ("tok_config_not_json", lambda d: _write(d, "tokenizer_config.json", "{\n\n]"), "tokenizer_config.json:3",
     "not valid JSON"),
    ("tok_config_list", lambda d: _write(d, "tokenizer_config.json", [1]), "tokenizer_config.json",
     "expected a JSON object"),
    ("template_syntax", _tok_config(chat_template="{% for m in messages %}{{ m.content }}"), "tokenizer_config.json",
     "not a valid jinja2 template"),
    ("template_int", _tok_config(chat_template=5), "tokenizer_config.json", "chat_template"),
    ("template_list_bad", _tok_config(chat_template=[{"template": "x"}]), "tokenizer_config.json", "chat_template"),
    ("template_file_syntax", lambda d: _write(d, "chat_template.jinja", "line 1\n{% if x %}"), "chat_template.jinja",
     "template line"),
    ("template_file_not_utf8", lambda d: _write(d, "chat_template.jinja", b"\xff\xfe{{ x }}"), "chat_template.jinja",
     "UTF-8"),
    # (special_tokens_map.json overrides tokenizer_config.json when the config has no added_tokens_decoder)
    ("eos_not_in_vocab", lambda d: (_tok_config(eos_token="<|nope|>")(d), os.unlink(os.path.join(d, STM))),
     "tokenizer_config.json", "'<|nope|>' is not a token"),
    ("eos_int", lambda d: (_tok_config(eos_token=5)(d), os.unlink(os.path.join(d, STM))), "tokenizer_config.json",
     "field 'eos_token'"),
    ("stm_list", lambda d: _write(d, "special_tokens_map.json", ["<|im_end|>"]), "special_tokens_map.json",
     "expected a JSON object"),
    ("stm_pad_unknown", lambda d: _write(d, "special_tokens_map.json", {"pad_token": "<pad>"}),
     "special_tokens_map.json", "'<pad>' is not a token"),
    ("gen_config_not_json", lambda d: _write(d, "generation_config.json", "{'eos_token_id': 2}"),
     "generation_config.json:1", "not valid JSON"),
    ("gen_eos_str", lambda d: _write(d, "generation_config.json", {"eos_token_id": "2"}), "generation_config.json",
     "eos_token_id"),
    ("gen_eos_beyond", lambda d: _write(d, "generation_config.json", {"eos_token_id": [2, 5000]}),
     "generation_config.json", "eos_token_id"),
    # shard index
    ("index_not_json", _sharded(lambda d, i: _write(d, INDEX, '{"weight_map": ')), INDEX, "not valid JSON"),
    ("index_no_map", _index(lambda d, i: i.pop("weight_map")), INDEX, "weight_map"),
    ("index_map_list", _index(lambda d, i: i.__setitem__("weight_map", list(i["weight_map"]))), INDEX, "weight_map"),
    ("index_missing_shard", _sharded(lambda d, i: os.unlink(os.path.join(d, max(i["weight_map"].values())))),
     INDEX, "lists shard"),
    ("index_traversal", _index(lambda d, i: i["weight_map"].__setitem__("model.norm.weight", "../x.safetensors")),
     INDEX, "not a file name inside the model directory"),
    ("index_wrong_shard", _index(lambda d, i: i["weight_map"].__setitem__(
        "model.norm.weight", sorted(set(i["weight_map"].values()))[0])), INDEX, "which does not hold it"),
    ("shard_truncated", _sharded(lambda d, i: _write(d, sorted(set(i["weight_map"].values()))[0],
                                                    _asset_bytes(WEIGHTS)[:300])), "model-00001-of-", "safetensors"),
]


def _expect_error(d, file: str, fragment: str) -> str:
    with pytest.raises(ModelError) as e:
        load_model(d, dtype="fp32", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert os.path.join(d, file) in msg, msg
    assert fragment in msg, msg
    return msg


def test_the_asset_itself_loads():
    model, tok = load_model(ASSET, dtype="fp32", device="cpu")
    assert model.config.vocab_size > tok.max_token_id


@pytest.mark.parametrize("mutate, file, fragment", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_model_directory_is_one_clear_error(tmp_path, mutate, file, fragment):
    d = _copy(tmp_path)
    mutate(d)
    _expect_error(d, file, fragment)


def test_missing_files_are_missing_model_file_errors(tmp_path):
    for name in ("config.json", WEIGHTS, "tokenizer.json"):
        d = _copy(tmp_path, name)
        os.unlink(os.path.join(d, name))
        with pytest.raises(MissingModelFile, match=name) as e:
            load_model(d, dtype="fp32", device="cpu")
        assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError) and d in str(e.value)


def test_absent_config_fields_take_the_transformers_defaults(tmp_path):
    """Without `tie_word_embeddings` transformers unties (its default is False for all three families); the
    loader tied a separate lm_head.weight silently instead (its dataclass default is True)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      tie_word_embeddings=False)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("tie_word_embeddings")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours, _ = load_model(str(tmp_path), dtype="fp32", device="cpu", with_tokenizer=False)
    assert not ours.config.tie_word_embeddings and not again.config.tie_word_embeddings
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), again(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ fuzz
def _fuzz_cases(rng: random.Random):
    """(name, mutate(d), file that breaks, whether a load may still succeed) for seeded random defects."""
    weights, tokenizer_json = _asset_bytes(WEIGHTS), _asset_bytes("tokenizer.json")
    header_len = struct.unpack("<Q", weights[:8])[0]
    header, _ = _split(weights)
    names = sorted(k for k in header if k != "__metadata__")
    cfg, tok_cfg = _asset_json("config.json"), _asset_json("tokenizer_config.json")
    bad_values = ["128", 0, -1, 1.5, None, True, [], {}, 10**12, "abc", [4], {"a": 1}, float("inf")]
    cases = []
    for _ in range(12):
        cut = rng.randrange(0, len(weights))
        cases.append((f"truncate@{cut}", lambda d, c=cut: _write(d, WEIGHTS, weights[:c]), WEIGHTS, False))
    for _ in range(6):
        n = rng.choice([0, 1, header_len - 1, header_len + 1, rng.randrange(2**20, 2**63)])
        cases.append((f"header_len={n}", lambda d, n=n: _write(d, WEIGHTS, struct.pack("<Q", n) + weights[8:]),
                      WEIGHTS, False))
    for _ in range(14):  # one byte of the JSON header changed: may hit the metadata and be harmless
        pos, byte = rng.randrange(8, 8 + header_len), rng.randrange(256)
        cases.append((f"header_byte@{pos}={byte}",
                      lambda d, p=pos, b=byte: _write(d, WEIGHTS, weights[:p] + bytes([b]) + weights[p + 1:]),
                      WEIGHTS, True))
    for _ in range(8):
        key, dtype = rng.choice(names), rng.choice(["F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "F8_E4M3", "x"])
        cases.append((f"dtype {key}={dtype}", _header_edit(lambda h, k=key, t=dtype: h[k].__setitem__("dtype", t)),
                      WEIGHTS, False))
    for _ in range(6):
        key = rng.choice(names)
        shape = [max(1, s + rng.choice([-1, 1])) for s in header[key]["shape"]] + rng.choice([[], [1]])
        cases.append((f"shape {key}={shape}", _header_edit(lambda h, k=key, s=shape: h[k].__setitem__("shape", s)),
                      WEIGHTS, False))
    for _ in range(6):
        drop = rng.choice(names)
        cases.append((f"drop {drop}", _state(lambda s, k=drop: s.pop(k)), WEIGHTS, False))
    shape_fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "model_type", "rope_theta", "rope_scaling", "rms_norm_eps",
                    "tie_word_embeddings", "hidden_act", "eos_token_id", "rope_parameters", "use_sliding_window"]
    for _ in range(30):
        key, value = rng.choice(shape_fields), rng.choice(bad_values)
        # a few values are legitimate for some fields (rms_norm_eps=None takes the default): success allowed,
        # but then the model must still match its weights and tokenizer (checked by the caller)
        cases.append((f"config {key}={value!r}", lambda d, k=key, v=value: _write(
            d, "config.json", json.dumps({**cfg, k: v})), "config.json", True))
    for _ in range(6):
        cut = rng.randrange(0, len(tokenizer_json))
        cases.append((f"tokenizer.json[:{cut}]", lambda d, c=cut: _write(d, "tokenizer.json", tokenizer_json[:c]),
                      "tokenizer.json", False))
    for _ in range(12):  # without special_tokens_map.json half the time: it overrides tokenizer_config.json's tokens
        key = rng.choice(["eos_token", "pad_token", "bos_token", "chat_template", "unk_token", "extra_special_tokens"])
        value = rng.choice(bad_values + ["{% if %}", "{{ messages[0] }", "<|nope|>", {"content": 3}])
        drop_map = rng.random() < 0.5

        def mutate(d, k=key, v=value, drop=drop_map):
            _write(d, "tokenizer_config.json", json.dumps({**tok_cfg, k: v}))
            if drop:
                os.unlink(os.path.join(d, STM))
        cases.append((f"tokenizer_config {key}={value!r} drop_map={drop_map}", mutate, "tokenizer_config.json", True))
    for _ in range(4):
        key, shard = rng.choice(names), rng.choice(["", "nope.safetensors", "../m.safetensors", "a/b", 3])
        cases.append((f"index {key} -> {shard!r}", _index(lambda d, i, k=key, s=shard: i["weight_map"].__setitem__(
            k, s)), INDEX, False))
    for _ in range(2):
        key = rng.choice(names)
        cases.append((f"index without {key}", _index(lambda d, i, k=key: i["weight_map"].pop(k)), INDEX, True))
    for _ in range(4):
        value = rng.choice(bad_values + [[2, 10**6], "x"])
        cases.append((f"generation_config eos={value!r}", lambda d, v=value: _write(
            d, "generation_config.json", json.dumps({"eos_token_id": v})), "generation_config.json", True))
    return cases


def test_fuzzed_model_directories_fail_cleanly_or_load_a_consistent_model(tmp_path):
    cases = _fuzz_cases(random.Random(20240611))
    failures = 0
    for i, (name, mutate, file, may_load) in enumerate(cases):
        d = _copy(tmp_path, f"case{i}")
        mutate(d)
        try:
            model, tok = load_model(d, dtype="fp32", device="cpu")
        except ModelError as e:
            msg = str(e)
            assert "\n" not in msg, (name, msg)
            assert os.path.join(d, file) in msg, (name, msg)
            failures += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point: nothing but ModelError may escape
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
        assert may_load, f"{name}: loaded although it cannot be a valid model"
        c = model.config
        assert tok.max_token_id < c.vocab_size, name
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode("What is 2 + 3?")]))
        assert logits.shape[-1] == c.vocab_size and torch.isfinite(logits).all(), name
    assert failures > 0.8 * len(cases), failures  # the fuzz really breaks things


# ------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("name, fragment", [("tpu9", "not a device name"), ("", "not a device name"),
                                            ("cuda:x", "not a device name"), ("meta", "not supported")])
def test_unknown_device_is_a_clear_error(name, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        resolve_device(name)
    assert f"device '{name}'" in str(e.value) and "\n" not in str(e.value)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:3", 0):
        with pytest.raises(ValueError, match=f"device '{name}': CUDA is not available"):
            resolve_device(name)
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(ValueError, match="device 'cuda'"):
        load_model(ASSET, dtype="fp32", device="cuda")


def test_cuda_index_past_the_visible_devices_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")


def test_plain_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
