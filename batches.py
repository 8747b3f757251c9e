"""How each kind of training data becomes the tensors a loss takes.

A method is a loss file plus a config. The config names the loss (`loss: dpo` -> losses/dpo.py
`dpo_loss`) and the `kind` of batch it eats; this file is the only place that knows the kinds:

  tokens    one sequence per example (SFT, pretraining)      -> logps, mask
  pairs     prompt + chosen + rejected (DPO, ORPO, CPO, SimPO) -> policy_chosen_logps, policy_rejected_logps,
            chosen_mask, rejected_mask (+ ref_chosen_logps, ref_rejected_logps with a reference)
  reward_pairs  prompt + chosen + rejected for a reward model -> chosen_rewards, rejected_rewards
  unpaired  prompt + completion + label (KTO)                -> policy_logps, mask, labels, kl_* (+ ref_logps)
  rollouts  prompts sampled on-line (GRPO family)            -> see rollout/rl.py
  nash_md   prompts sampled on-line, policy vs mixture (Nash-MD) -> see rollout/nash_md.py

Log-probs are per token, (B, T-1), position t scoring token t+1, with the loss mask shifted the
same way; each loss reduces them itself (masked_sum / masked_mean) and says how. Chosen and
rejected go through the model in one concatenated forward. `call_loss` passes a loss only the
arguments its signature names, so a new loss with the same inputs needs no change here.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from data.formats import collate, load_dataset, pack_examples, read_jsonl, tokenize_pair
from losses.common import sequence_logprobs
from losses.reward import sequence_rewards

KINDS = ("tokens", "pairs", "reward_pairs", "unpaired", "rollouts", "nash_md")


def resolve_loss(name: str):
    """`dpo` -> losses.dpo.dpo_loss; `losses.dpo:dpo_loss` or `my.module:fn` as written."""
    module, _, fn = name.partition(":")
    if not fn:
        module, fn = f"losses.{name}", f"{name}_loss"
    return getattr(importlib.import_module(module), fn)


def call_loss(fn, inputs: dict, args: dict):
    """fn(**inputs the signature accepts, **args): (loss, metrics)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in inputs.items() if k in params}, **args)


# ----------------------------------------------------------------------------- examples
def load_examples(path: str, kind: str, fmt: str, tok, max_length: int) -> list[dict]:
    """Read, validate and tokenize a whole training file for a batch kind."""
    if kind == "tokens":
        return load_dataset(path, fmt, tok, max_length)[0]
    if kind in ("rollouts", "nash_md"):  # prompts (+ the columns the rewards read); tokenized when sampled
        return read_jsonl(path, fmt)
    if kind in ("pairs", "reward_pairs"):
        rows = read_jsonl(path, "preference")
        out = [{"chosen": tokenize_pair(r["prompt"], r["chosen"], tok, max_length),
                "rejected": tokenize_pair(r["prompt"], r["rejected"], tok, max_length)} for r in rows]
    elif kind == "unpaired":
        rows = read_jsonl(path, "kto")
        out = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"],
                "seq": tokenize_pair(r["prompt"], r["completion"], tok, max_length)} for r in rows]
    else:
        raise ValueError(f"unknown batch kind {kind!r}; expected one of {KINDS}")
    n_trunc = sum(any(v.get("truncated", False) for v in ex.values() if isinstance(v, dict)) for ex in out)
    if n_trunc:
        print(f"warning: {path}: truncated {n_trunc} of {len(out)} examples to max_length={max_length}")
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


PACK_ROW = 64  # padding-free rows hold up to max(PACK_ROW, longest sequence) tokens


def _logps(model, seqs: list[dict], tok, device, padding_free: bool = False):
    """Per-token log-probs (B, T-1) and shifted loss mask of `seqs`, and the real tokens run.

    padding_free: the sequences run packed into a few rows (model/transformer.py document
    attention) instead of padded to the longest one, and the log-probs are unpacked to the usual
    (B, T-1) layout: same values, fewer tokens through the model.
    """
    if not padding_free or "document_ids" in seqs[0]:
        b = _to(collate(seqs, tok.pad_token_id), device)
        logp, mask = sequence_logprobs(model, b["input_ids"], b["loss_mask"], document_ids=b.get("document_ids"))
        return logp, mask, int(b["attention_mask"].sum())
    width = max(len(s["input_ids"]) for s in seqs)
    rows = pack_examples(seqs, max(width, PACK_ROW))
    b = _to(collate(rows, tok.pad_token_id), device)
    row_logp, _ = sequence_logprobs(model, b["input_ids"], b["loss_mask"], document_ids=b["document_ids"])
    r_idx, src, dst_i, dst_j, i = [], [], [], [], 0  # row r position start+j scores token j+1 of sequence i
    for r, row in enumerate(rows):
        start = 0
        for n in torch.unique_consecutive(torch.tensor(row["document_ids"]), return_counts=True)[1].tolist():
            r_idx += [r] * (n - 1)
            src += range(start, start + n - 1)
            dst_i += [i] * (n - 1)
            dst_j += range(n - 1)
            start, i = start + n, i + 1
    picked = row_logp[torch.tensor(r_idx, device=device), torch.tensor(src, device=device)]
    logp = row_logp.new_zeros(len(seqs), width - 1).index_put(
        (torch.tensor(dst_i, device=device), torch.tensor(dst_j, device=device)), picked)
    mask = collate(seqs, tok.pad_token_id)["loss_mask"][:, 1:].to(device=device, dtype=logp.dtype)
    return logp, mask, sum(len(s["input_ids"]) for s in seqs)


def _ref_logps(ref, seqs, tok, device, padding_free: bool = False):
    """Reference per-token log-probs: precomputed ones when the examples carry them, else a forward of `ref`."""
    if all("ref_logps" in s for s in seqs):
        width = max(len(s["input_ids"]) for s in seqs) - 1
        out = torch.zeros(len(seqs), width, device=device)
        for i, s in enumerate(seqs):
            out[i, :len(s["ref_logps"])] = torch.tensor(s["ref_logps"], device=device)
        return out
    with torch.no_grad():
        return _logps(ref, seqs, tok, device, padding_free)[0]


class DatasetSource:
    """Micro-batches for offline kinds: `grad_accum` batches of `batch_size` examples per step and
    process, reshuffled (seeded) every epoch.

    Under torchrun every rank draws the same global step (grad_accum × world micro-batches) from the
    same generator and keeps micro-batches rank, rank + world, ...: N processes see exactly what one
    process with grad_accum × N sees. `state_dict()` is the data position a checkpoint stores.
    """

    def __init__(self, examples: list[dict], batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.examples, self.bs, self.accum = examples, batch_size, grad_accum
        self.rank, self.world = rank, world
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.cursor = [], 0
        self.last_indices: list[list[int]] = []  # this rank's example indices of the last step, for error reports

    def step(self, model=None) -> tuple[list[list[dict]], dict]:
        picked = []
        for _ in range(self.accum * self.world):
            if self.cursor + self.bs > len(self.order):
                self.order, self.cursor = torch.randperm(len(self.examples), generator=self.gen).tolist(), 0
            picked.append(self.order[self.cursor:self.cursor + self.bs])
            self.cursor += self.bs
        self.last_indices = picked[self.rank::self.world]
        return [[self.examples[i] for i in idx] for idx in self.last_indices], {}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.cursor = list(state["order"]), state["cursor"]


def loss_inputs(kind: str, model, ref, examples: list[dict], tok, device, padding_free: bool = True) -> tuple[dict, int]:
    """The keyword inputs of a loss for one micro-batch, and the number of real tokens it ran.

    padding_free (pairs, unpaired): the micro-batch's sequences run packed, not padded (`_logps`);
    `method.padding_free=false` turns it off.
    """
    if kind == "tokens":
        logps, mask, ntok = _logps(model, examples, tok, device)
        return {"logp": logps, "mask": mask}, ntok
    if kind == "pairs":
        seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        logps, mask, ntok = _logps(model, seqs, tok, device, padding_free)
        B = len(examples)
        inputs = {"policy_chosen_logps": logps[:B], "policy_rejected_logps": logps[B:],
                  "chosen_mask": mask[:B], "rejected_mask": mask[B:]}
        if ref is not None or all("ref_logps" in s for s in seqs):
            r = _ref_logps(ref, seqs, tok, device, padding_free)
            inputs.update(ref_chosen_logps=r[:B], ref_rejected_logps=r[B:])
        return inputs, ntok
    if kind == "reward_pairs":  # a reward model: the scalar head on each sequence's last real token
        seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        b = _to(collate(seqs, tok.pad_token_id), device)
        r = sequence_rewards(model, lambda h: model.score(h).squeeze(-1), b["input_ids"], b["attention_mask"])
        B = len(examples)
        return {"chosen_rewards": r[:B], "rejected_rewards": r[B:]}, int(b["attention_mask"].sum())
    if kind == "unpaired":
        seqs = [e["seq"] for e in examples]
        logps, mask, ntok = _logps(model, seqs, tok, device, padding_free)
        labels = torch.tensor([e["label"] for e in examples], device=device)
        inputs = {"policy_logps": logps, "mask": mask, "labels": labels}
        # KL reference point: prompt i with the completion of example i+1 (mismatched pairs), no gradient
        kl = [tokenize_pair(e["prompt"], examples[(i + 1) % len(examples)]["completion"], tok, None)
              for i, e in enumerate(examples)]
        with torch.no_grad():
            kl_logps, kl_mask, _ = _logps(model, kl, tok, device, padding_free)
            inputs.update(kl_policy_logps=kl_logps, kl_mask=kl_mask)
            if ref is not None:
                inputs.update(ref_logps=_logps(ref, seqs, tok, device, padding_free)[0],
                              kl_ref_logps=_logps(ref, kl, tok, device, padding_free)[0])
        return inputs, ntok
    raise ValueError(f"unknown batch kind {kind!r}; expected one of {KINDS}")


@torch.no_grad()
def precompute_reference(ref, examples: list[dict], kind: str, tok, device, batch_size: int = 32) -> None:
    """Store the reference per-token log-probs in each pair example (`ref_logps`), so no reference
    model has to stay in memory during training (`method.precompute_ref=true`)."""
    if kind != "pairs":
        raise ValueError("precompute_ref is supported for pair methods (DPO and variants)")
    seqs = [s for e in examples for s in (e["chosen"], e["rejected"])]
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        logp, mask, _ = _logps(ref, chunk, tok, device)
        for s, row in zip(chunk, logp):
            s["ref_logps"] = row[:len(s["input_ids"]) - 1].tolist()
