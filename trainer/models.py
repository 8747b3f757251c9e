"""The model side of a run: load (or build) it, add adapters, keep a reference, save the result.

    load(cfg, device, dtype)       model.path (any HF directory or hub id) -> (model, tokenizer); or a
                                   fresh tokenizer + model for pretraining (`method.scratch`)
    add_adapters(model, cfg)       lora=lora|dora|qlora wraps the target linears, freezing the rest
    make_reference(model, cfg, a)  the frozen reference: the base with adapters disabled for adapter
                                   runs (nothing copied), a frozen copy for full fine-tuning
    save_final(model, cfg, ...)    checkpoints/final: a HF model directory, or a PEFT adapter directory;
                                   refused when any weight is not finite; `method.export` copied atomically
"""
from __future__ import annotations

import copy
import math
import os
import shutil

import torch

from data.formats import read_jsonl
from lora.inject import adapters_disabled, apply_adapters, export_merged
from lora.peft_io import save_adapter
from model.load import load_model, replace_dir, save_model
from trainer import distributed
from trainer.paths import repo_path


def load(cfg, device, dtype):
    """(model, tokenizer) for a run: model.path, or a fresh one when the method builds from scratch."""
    if getattr(cfg.method, "scratch", None) is not None:  # programs (steer, abliterate) never build one
        return build_from_scratch(cfg, device, dtype)
    model, tok = load_model(repo_path(cfg.model.path), dtype=dtype, device=device)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model, tok


def build_from_scratch(cfg, device, dtype):
    """method=pretrain: a BPE tokenizer trained on the corpus and a freshly initialised model."""
    from model.config import ModelConfig
    from model.train_tokenizer import train_tokenizer
    from model.transformer import Transformer

    s = cfg.method.scratch
    path = repo_path(cfg.data.train or cfg.method.train_file or cfg.data.files.get(cfg.method.data_format))
    texts = [ex["text"] for ex in read_jsonl(path, "text")]
    tok = train_tokenizer(texts, vocab_size=s.tokenizer_vocab_size)
    config = ModelConfig(**s.arch, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(cfg.seed)
    model = Transformer(config)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=s.init_std)
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # GPT-2 style residual scaling
                p.data /= math.sqrt(2 * config.num_hidden_layers)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model.to(device=device, dtype=dtype), tok


def add_adapters(model, cfg, verbose: bool = True) -> bool:
    """`lora=lora|dora|qlora`: wrap the target linears (freezing the rest). Returns whether it did."""
    a = cfg.lora
    if a.kind == "none":
        return False
    names = apply_adapters(model, kind=a.kind, rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets,
                           use_rslora=a.use_rslora, quantize=a.quantize)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        distributed.log(f"[posttrain] {a.kind}{' (NF4 base)' if a.quantize else ''} adapters on {len(names)} linears: "
                        f"{n_train:,} trainable parameters")
    return True


class AdaptersDisabled:
    """The reference policy of an adapter run: the same model with every adapter switched off.

    Callable like the model (always without gradient); nothing is copied.
    """

    def __init__(self, policy):
        self.policy, self.model, self.config = policy, policy.model, policy.config

    @property
    def lm_head_weight(self):
        return self.policy.lm_head_weight

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy), torch.no_grad():
            return self.policy(*args, **kwargs)


def make_reference(model, cfg, adapters: bool):
    """The frozen reference policy of a method with `reference: true` (None otherwise)."""
    if not cfg.method.reference:
        return None
    if adapters:
        return AdaptersDisabled(model)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def nonfinite_tensors(model) -> list[str]:
    """Names of parameters and buffers holding NaN or inf (all of them, trainable or not)."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and not torch.isfinite(t).all()]


def save_final(model, cfg, tok, run_dir: str, adapters: bool, dtype) -> str:
    """checkpoints/final: a HF model directory, or a PEFT adapter directory for adapter runs.

    Distributed: every rank gathers the full state to rank 0, which writes it from a fresh copy.
    Non-finite weights are never saved: the run stops with the names of the bad tensors instead."""
    final = os.path.join(run_dir, "checkpoints", "final")
    if distributed.world_size() > 1:
        state = distributed.full_state_dict(model)
        if not distributed.is_main():
            return final
        model, _ = load_model(repo_path(cfg.model.path), dtype=dtype, device="cpu", with_tokenizer=False)
        add_adapters(model, cfg, verbose=False)
        model.load_state_dict(state, strict=False)
    bad = nonfinite_tensors(model)
    if bad:
        raise FloatingPointError(f"refusing to save {final}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:4])}"
                                 f"{', ...' if len(bad) > 4 else ''}); lower method.lr or check the input model")
    if adapters:  # loads with peft.PeftModel.from_pretrained
        save_adapter(model, final, base_model_name_or_path=str(cfg.model.path), tokenizer=tok)
        if cfg.lora.export_merged:
            export_merged(model, os.path.join(run_dir, "checkpoints", "merged"), tok)
    else:
        save_model(model, final, tok)
    if cfg.method.export:
        export = os.path.abspath(repo_path(cfg.method.export))
        tmp = export + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)
        replace_dir(tmp, export)  # a kill leaves the old export or the new one, never part of either
        distributed.log(f"[posttrain] exported to {export}")
    return final
