"""Kind `tokens`: one sequence per example, the loss on its trained tokens (SFT, pretraining).

SFT examples (instruction/output or chat messages) are trained on the assistant turns only;
pretraining text on every token. Two ways to avoid padding:
    packing: true    whole examples packed into rows of up to data.max_length tokens, attention
                     kept inside each example and positions restarted (same loss as padding)
    pack: N          plain text concatenated and cut into blocks of N tokens, attention crossing
                     document boundaries (GPT-style pretraining; the tail is dropped)
Loss inputs: logp, mask (B, T-1), position t scoring token t+1.
"""
from __future__ import annotations

from dataclasses import dataclass

from data.formats import load_dataset, pack_examples
from trainer import distributed
from trainer.config import opt, register_options
from trainer.feeds import DatasetFeed, DatasetMethod, register_feed
from trainer.forward import sequence_logps


@register_options("tokens")
@dataclass
class TokensMethod(DatasetMethod):
    """SFT and pretraining: one sequence per example."""
    packing: bool = opt(False, "pack whole examples into rows (no padding; attention stays within each example)")
    pack: int | None = opt(None, "pretraining: concatenate texts and train on blocks of this many tokens", min=2)


def blocks(examples: list[dict], block: int) -> list[dict]:
    """Concatenate tokenized examples and cut them into blocks of `block` tokens (no padding)."""
    ids = [i for ex in examples for i in ex["input_ids"]]
    return [{"input_ids": ids[i:i + block], "loss_mask": [1] * block, "truncated": False}
            for i in range(0, len(ids) - block + 1, block)]


@register_feed("tokens")
class TokensFeed(DatasetFeed):
    def load(self, model, run_dir: str) -> None:
        path, max_length = self.training_file(), self.cfg.data.max_length
        examples = load_dataset(path, self.m.data_format, self.tok, max_length)[0]
        if self.m.pack:
            examples = blocks(examples, self.m.pack)
        elif self.m.packing:
            n = len(examples)
            examples = pack_examples(examples, max_length)
            distributed.log(f"[posttrain] packed {n} examples into {len(examples)} rows of up to {max_length} tokens")
        self.examples = examples

    def loss_inputs(self, model, ref, micro):
        logp, mask, ntok = sequence_logps(model, micro, self.tok, self.device)
        return {"logp": logp, "mask": mask}, ntok, {}
