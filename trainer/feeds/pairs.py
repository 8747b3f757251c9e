"""Kind `pairs`: prompt + chosen + rejected (DPO and its variants, ORPO, CPO, SimPO).

Chosen and rejected run through the model in one forward, padding-free by default (packed rows,
unpacked to the padded layout: same log-probs, fewer tokens). Loss inputs: policy_chosen_logps,
policy_rejected_logps, chosen_mask, rejected_mask, and ref_chosen_logps / ref_rejected_logps when
the method keeps a reference (or the examples carry precomputed ones).

`precompute_ref: true` runs the reference once over the whole file before training and frees it.
`on_policy: {...}` replaces the fixed pairs' mistakes with the starting model's own: before training
every prompt of `on_policy.prompts` is sampled and verified (rollout/pairs.py), and the pairs plus
the training file's rows of `keep_tasks` are written to RUN/on_policy_pairs.jsonl, which is then read
and validated like any other training file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from data.formats import read_jsonl, tokenize_pair
from trainer import distributed
from trainer.config import ConfigError, opt, register_options
from trainer.feeds import DatasetFeed, DatasetMethod, register_feed
from trainer.forward import reference_logps, sequence_logps
from trainer.paths import repo_path


@dataclass
class OnPolicy:
    """Pairs from the starting model's own verified samples (rollout/pairs.py)."""
    prompts: str = opt("data/synthetic/grpo_train.jsonl", "prompt records with the columns the reward reads")
    reward: str = opt("math_answer", "a registered reward; right = reward >= 1")
    samples: int = opt(8, "completions per prompt", min=2)
    temperature: float = opt(1.0, "sampling temperature", min=0)
    max_new_tokens: int = opt(16, "tokens per completion", min=1)
    pairs_per_prompt: int = opt(1, "distinct wrong completions paired with the most frequent right one", min=1)
    keep_tasks: list[str] = opt([], "rows of the training file whose `task` is one of these are kept beside the pairs")


@register_options("pairs")
@dataclass
class PairsMethod(DatasetMethod):
    """Preference pairs: DPO, IPO, RPO, ORPO, CPO, SimPO."""
    padding_free: bool = opt(True, "run chosen+rejected packed into rows instead of padded")
    precompute_ref: bool = opt(False, "reference log-probs computed once before training; the copy is freed")
    on_policy: OnPolicy | None = opt(None, "build the pairs from the starting model's own samples")


def tokenize_pairs(rows: list[dict], tok, max_length: int, path: str) -> list[dict]:
    out = [{"chosen": tokenize_pair(r["prompt"], r["chosen"], tok, max_length),
            "rejected": tokenize_pair(r["prompt"], r["rejected"], tok, max_length)} for r in rows]
    n = sum(e["chosen"]["truncated"] or e["rejected"]["truncated"] for e in out)
    if n:
        distributed.log(f"warning: {path}: truncated {n} of {len(out)} pairs to max_length={max_length}")
    return out


@register_feed("pairs")
class PairsFeed(DatasetFeed):
    def load(self, model, run_dir: str) -> None:
        path = self.on_policy_file(model, run_dir) if self.m.on_policy else self.training_file()
        self.examples = tokenize_pairs(read_jsonl(path, "preference"), self.tok, self.cfg.data.max_length, path)

    def on_policy_file(self, model, run_dir: str) -> str:
        from rollout.pairs import sample_pairs
        from rollout.rewards import get_rewards
        from rollout.sampler import SamplingConfig

        o = self.m.on_policy
        reward = get_rewards([o.reward])[0]
        rows = read_jsonl(repo_path(o.prompts), "prompt", require=reward.columns)
        sampling = SamplingConfig(max_new_tokens=o.max_new_tokens, temperature=o.temperature)
        pairs, stats = sample_pairs(model, self.tok, rows, reward, samples=o.samples,
                                    sampling=sampling, seed=self.cfg.seed, pairs_per_prompt=o.pairs_per_prompt,
                                    progress=self.cfg.progress and distributed.is_main())
        keep = set(o.keep_tasks)
        kept = [r for r in read_jsonl(self.training_file(), "preference") if r.get("task") in keep] if keep else []
        if not pairs and not kept:
            raise ConfigError(f"method.on_policy: no pairs from {o.prompts} (every prompt's {o.samples} samples "
                              f"agreed: {stats}) and no kept rows; raise temperature or samples")
        path = os.path.join(run_dir, "on_policy_pairs.jsonl")
        distributed.log(f"[posttrain] on-policy pairs: {stats['pairs']} from {stats['prompts']} prompts x {o.samples} "
                        f"samples (samples right {stats['sample_accuracy']:.0%}, all right {stats['all_right']:.0%}, "
                        f"all wrong {stats['all_wrong']:.0%}) + {len(kept)} rows of tasks {sorted(keep)} -> {path}")
        if distributed.is_main():
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in pairs + kept)
        distributed.barrier()
        return path

    def use_reference(self, ref):
        if ref is None or not self.m.precompute_ref:
            return ref
        precompute_reference(ref, self.examples, self.tok, self.device)
        return None  # the log-probs live in the examples now; the copy's memory is freed

    def sequences(self, example) -> list[dict]:
        return [example["chosen"], example["rejected"]]

    def loss_inputs(self, model, ref, micro):
        seqs = [e["chosen"] for e in micro] + [e["rejected"] for e in micro]
        logps, mask, ntok = sequence_logps(model, seqs, self.tok, self.device, self.m.padding_free)
        B = len(micro)
        inputs = {"policy_chosen_logps": logps[:B], "policy_rejected_logps": logps[B:],
                  "chosen_mask": mask[:B], "rejected_mask": mask[B:]}
        if ref is not None or all("ref_logps" in s for s in seqs):
            r = reference_logps(ref, seqs, self.tok, self.device, self.m.padding_free)
            inputs.update(ref_chosen_logps=r[:B], ref_rejected_logps=r[B:])
        return inputs, ntok, {}


@torch.no_grad()
def precompute_reference(ref, examples: list[dict], tok, device, batch_size: int = 32) -> None:
    """Store the reference per-token log-probs in each pair example (`ref_logps`)."""
    seqs = [s for e in examples for s in (e["chosen"], e["rejected"])]
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        logp, _, _ = sequence_logps(ref, chunk, tok, device)
        for s, row in zip(chunk, logp):
            s["ref_logps"] = row[:len(s["input_ids"]) - 1].tolist()
