"""Kind `unpaired`: prompt + completion + desirable/undesirable label (KTO).

Loss inputs: policy_logps, mask, labels, and KTO's reference point from mismatched pairs: prompt i
with the completion of example i+1 (no gradient), kl_policy_logps / kl_mask (+ ref_logps and
kl_ref_logps with a reference). The mismatched pairs are truncated to data.max_length like the
examples themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.formats import read_jsonl, tokenize_pair
from trainer import distributed
from trainer.config import opt, register_options
from trainer.feeds import DatasetFeed, DatasetMethod, register_feed
from trainer.forward import sequence_logps


@register_options("unpaired")
@dataclass
class UnpairedMethod(DatasetMethod):
    """Unpaired good/bad completions: KTO."""
    padding_free: bool = opt(True, "run the sequences packed into rows instead of padded")


@register_feed("unpaired")
class UnpairedFeed(DatasetFeed):
    def load(self, model, run_dir: str) -> None:
        path, n = self.training_file(), self.cfg.data.max_length
        rows = read_jsonl(path, "kto")
        self.examples = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"],
                          "seq": tokenize_pair(r["prompt"], r["completion"], self.tok, n)} for r in rows]
        truncated = sum(e["seq"]["truncated"] for e in self.examples)
        if truncated:
            distributed.log(f"warning: {path}: truncated {truncated} of {len(rows)} examples to max_length={n}")

    def sequences(self, example) -> list[dict]:
        return [example["seq"]]

    def loss_inputs(self, model, ref, micro):
        seqs, pf, dev = [e["seq"] for e in micro], self.m.padding_free, self.device
        logps, mask, ntok = sequence_logps(model, seqs, self.tok, dev, pf)
        inputs = {"policy_logps": logps, "mask": mask, "labels": torch.tensor([e["label"] for e in micro], device=dev)}
        kl = [tokenize_pair(e["prompt"], micro[(i + 1) % len(micro)]["completion"], self.tok, self.cfg.data.max_length)
              for i, e in enumerate(micro)]
        with torch.no_grad():
            kl_logps, kl_mask, _ = sequence_logps(model, kl, self.tok, dev, pf)
            inputs.update(kl_policy_logps=kl_logps, kl_mask=kl_mask)
            if ref is not None:
                inputs.update(ref_logps=sequence_logps(ref, seqs, self.tok, dev, pf)[0],
                              kl_ref_logps=sequence_logps(ref, kl, self.tok, dev, pf)[0])
        return inputs, ntok, {}
