"""lora/peft_io.py: adapters round-trip with PEFT (test-only reference) on the transformers model.

A random tiny transformers model (Qwen3, and Llama with every bias on so DoRA's bias handling is
exercised) is saved with `save_pretrained` and loaded here with `model.load.load_model`. Ours -> PEFT:
adapters made here, perturbed (B != 0, magnitudes moved), written by `save_adapter`, loaded by
`peft.PeftModel.from_pretrained` on the transformers model: same logits to 1e-4. PEFT -> ours:
adapters made by `get_peft_model`, perturbed, written by PEFT's `save_pretrained`, loaded by
`load_adapter`: same logits. Plus the config fields, strictness and the QLoRA reload path.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

from lora.inject import adapter_modules, apply_adapters, trainable_parameters  # noqa: E402
from lora.layers import DoRALinear  # noqa: E402
from lora.peft_io import load_adapter, save_adapter  # noqa: E402
from model.load import load_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations inside peft

VOCAB = 77
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=12, tie_word_embeddings=True),
    "llama_bias": lambda: LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, (family, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        hf = AutoModelForCausalLM.from_config(make()).float().eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.1 * torch.randn_like(p))
        directory = tmp_path_factory.mktemp(family)
        hf.save_pretrained(str(directory))
        out[family] = str(directory)
    return out


def _hf(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _ours(directory):
    return load_model(directory, dtype="fp32", device="cpu", with_tokenizer=False)[0]


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _perturb(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


CASES = {  # name: (family, apply_adapters kwargs)
    "lora_qwen3": ("qwen3", dict(kind="lora", rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))),
    "lora_rslora_all_linear": ("llama_bias", dict(kind="lora", rank=3, alpha=5, targets="all-linear",
                                                  use_rslora=True)),
    "dora_qwen3": ("qwen3", dict(kind="dora", rank=4, alpha=8)),
    "dora_llama_bias": ("llama_bias", dict(kind="dora", rank=2, alpha=6, targets=("o_proj", "up_proj", "k_proj"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(tmp_path, checkpoints, case):
    family, kw = CASES[case]
    model = _ours(checkpoints[family])
    apply_adapters(model, **kw)
    _perturb(trainable_parameters(model))
    with torch.no_grad():
        ours = model(IDS)
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=checkpoints[family])

    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == kw["rank"] and cfg["lora_alpha"] == kw["alpha"] and cfg["fan_in_fan_out"] is False
    assert cfg["use_dora"] == (kw["kind"] == "dora") and cfg["use_rslora"] == kw.get("use_rslora", False)
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if kw["kind"] == "dora" else ())
    assert keys == {f"base_model.model.{n}.{s}" for n in adapter_modules(model) for s in suffixes}
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys or case == "dora_llama_bias"

    peft_model = PeftModel.from_pretrained(_hf(checkpoints[family]), str(tmp_path / "adapter")).eval()
    n_peft = sum(1 for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert n_peft == len(adapter_modules(model))
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
        base = _hf(checkpoints[family])(input_ids=IDS).logits
    assert (theirs - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


PEFT_CASES = {
    "lora_qwen3": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"])),
    "lora_all_linear": ("llama_bias", dict(r=3, lora_alpha=7, target_modules="all-linear", use_rslora=True)),
    "dora_qwen3": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj", "up_proj"], use_dora=True)),
    "dora_llama_bias": ("llama_bias", dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_to_ours(tmp_path, checkpoints, case):
    family, kw = PEFT_CASES[case]
    torch.manual_seed(5)
    peft_model = get_peft_model(_hf(checkpoints[family]), LoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    _perturb([p for n, p in peft_model.named_parameters() if "lora_" in n])
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    model = _ours(checkpoints[family])
    names = load_adapter(model, str(tmp_path / "adapter"))
    assert all(isinstance(m, DoRALinear) == bool(kw.get("use_dora")) for m in adapter_modules(model).values())
    assert len(names) == sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    with torch.no_grad():
        ours = model(IDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_load_is_strict_and_refuses_unsupported_configs(tmp_path, checkpoints):
    model = _ours(checkpoints["qwen3"])
    apply_adapters(model, kind="dora", rank=2, alpha=4, targets=("q_proj",))
    save_adapter(model, str(tmp_path / "a"))
    weights = str(tmp_path / "a" / "adapter_model.safetensors")
    full = load_file(weights)

    dropped = dict(full)
    dropped.pop(next(k for k in full if k.endswith("lora_magnitude_vector")))
    save_file(dropped, weights)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(_ours(checkpoints["qwen3"]), str(tmp_path / "a"))
    extra = dict(full, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 32)})
    save_file(extra, weights)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(_ours(checkpoints["qwen3"]), str(tmp_path / "a"))
    save_file(full, weights)

    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    for field, value in (("bias", "all"), ("rank_pattern", {"q_proj": 8}), ("peft_type", "IA3")):
        json.dump(dict(cfg, **{field: value}), open(cfg_path, "w"))
        with pytest.raises(ValueError, match=field):
            load_adapter(_ours(checkpoints["qwen3"]), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError):
        load_adapter(_ours(checkpoints["qwen3"]), str(tmp_path / "nothing"))


def test_qlora_adapter_reloads_onto_a_fresh_nf4_base(tmp_path, checkpoints):
    """The resume path of a QLoRA run: base quantised again (deterministic) + adapter = the same model."""
    model = _ours(checkpoints["llama_bias"])
    apply_adapters(model, kind="dora", rank=2, alpha=4, quantize=True)
    _perturb(trainable_parameters(model))
    with torch.no_grad():
        want = model(IDS)
    save_adapter(model, str(tmp_path / "q"))
    again = _ours(checkpoints["llama_bias"])
    load_adapter(again, str(tmp_path / "q"), quantize=True)
    with torch.no_grad():
        assert torch.equal(again(IDS), want)
    # loading into a model that already has the adapters (resume after apply_adapters) only copies weights
    third = _ours(checkpoints["llama_bias"])
    apply_adapters(third, kind="dora", rank=2, alpha=4, quantize=True)
    load_adapter(third, str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(third(IDS), want)
    assert os.path.isfile(tmp_path / "q" / "adapter_config.json")
