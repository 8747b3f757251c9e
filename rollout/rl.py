"""Rollout batches for the policy-gradient methods (GRPO, DAPO, Dr.GRPO, RLVR).

One generation batch = `prompts_per_step` prompts x `num_generations` samples, drawn on the
project's KV-cached sampler: each prompt is prefilled once and its G samples share the cache, and
the sampler returns the log-probs of the sampled tokens, which are the "old" log-probs of the
clipped surrogate (no second forward while the policy has not changed). Rewards come from the
registered reward functions (rollout/rewards.py), summed with `reward_weights`; advantages are
group-relative (losses/grpo.py). DAPO's dynamic sampling drops groups whose rewards all tie and
draws more prompts, up to `max_resample` extra rounds, counting what it dropped.

The same batch is reused for `num_iterations` optimiser steps (the μ of GRPO): the first step is
exactly on-policy (ratio 1); later ones are clipped against the kept old log-probs.

Offline groups (the seeds' scored `responses` or RLVR `correct` flags) take the same path without
generation: the given texts are tokenized as completions, their rewards are the given scores, and
their old log-probs come from one no-grad forward of the current policy.
"""
from __future__ import annotations

import time

import torch

from data.formats import tokenize_prompt
from losses.common import masked_mean, token_logprobs
from losses.grpo import dynamic_sampling_keep, group_advantages, overlong_penalty
from rollout.rewards import get_rewards, reward_model_reward
from rollout.sampler import Rollout, SamplingConfig, generate


def completion_logprobs(model, prompt_lens: list[int], seqs: list[list[int]], width: int, pad_id: int,
                        temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs (N, width) of the completion tokens of `seqs` (prompt + completion, unpadded) under `model`.

    Column j is completion token j, matching the sampler's layout; right-padded, causal, no mask needed.
    """
    device = model.model.embed_tokens.weight.device
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, device=device)
    hidden = model(ids, hidden_only=True)
    start = torch.tensor(prompt_lens, device=device)[:, None] - 1  # position t predicts token t+1
    pos = (start + torch.arange(width, device=device)[None]).clamp(max=T - 2)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    labels = ids.gather(1, (pos + 1).clamp(max=T - 1))
    return token_logprobs(h, model.lm_head_weight, labels, temperature, with_entropy=with_entropy)


def shared_prompt_logprobs(model, prompt_lens: list[int], seqs: list[list[int]], width: int, pad_id: int,
                           temperature: float = 1.0, with_entropy: bool = False):
    """`completion_logprobs` with each prompt run once for all its samples (same values, with gradient).

    A rollout batch holds G completions per prompt, and prompts are most of its tokens. Consecutive
    rows with the same prompt form a group: the group's prompt is prefilled once (left-padded, into a
    KV cache that keeps the autograd graph), the cache rows are repeated for the group's samples, and
    the completions run on top of it. The prompt's last hidden state scores completion token 0; the
    prompt's activations get the gradient of every sample of its group. Not with gradient
    checkpointing (recomputing a block would write the cache a second time).
    """
    from model.transformer import KVCache

    device = model.model.embed_tokens.weight.device
    starts = [i for i in range(len(seqs)) if i == 0 or prompt_lens[i] != prompt_lens[i - 1]
              or seqs[i][:prompt_lens[i]] != seqs[i - 1][:prompt_lens[i - 1]]]
    counts = torch.tensor([b - a for a, b in zip(starts, starts[1:] + [len(seqs)])], device=device)
    prompts = [seqs[i][:prompt_lens[i]] for i in starts]
    P = max(len(p) for p in prompts)
    pids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    pmask = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at slot P - 1
        pids[i, P - len(p):] = torch.tensor(p, device=device)
        pmask[i, P - len(p):] = 1
    cache = KVCache(model.config, len(prompts), P + width, device, model.model.embed_tokens.weight.dtype)
    last = model(pids, attention_mask=pmask, cache=cache, cache_pos=0, hidden_only=True)[:, -1]
    rows = torch.repeat_interleave(torch.arange(len(prompts), device=device), counts)
    comp = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    cmask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        c = s[n:n + width]
        comp[i, :len(c)] = torch.tensor(c, device=device)
        cmask[i, :len(c)] = 1
    hidden = model(comp[:, :-1], attention_mask=cmask[:, :-1], cache=cache.index_select(rows), cache_pos=P,
                   hidden_only=True) if width > 1 else last.new_zeros(len(seqs), 0, last.shape[-1])
    h = torch.cat([last[rows][:, None], hidden], 1)  # position j predicts completion token j
    return token_logprobs(h, model.lm_head_weight, comp, temperature, with_entropy=with_entropy)


class RolloutSource:
    """Yields the micro-batches of each optimiser step for kind `rollouts`."""

    def __init__(self, rows: list[dict], tok, cfg, seed: int, rank: int = 0, world: int = 1):
        m = cfg
        self.rank, self.world = rank, world
        field = m.get("prompt_field", "prompt")
        if field != "prompt":  # e.g. RLVR's `problem`: the reward functions see it as the prompt
            rows = [{**{k: v for k, v in r.items() if k != field}, "prompt": r[field]} for r in rows]
        self.rows, self.tok, self.m = rows, tok, m
        self.offline = "responses" in rows[0]
        self.reward_fns = [reward_model_reward(m.reward_model) if name == "reward_model" else get_rewards([name])[0]
                           for name in m.reward]
        self.weights = list(m.get("reward_weights") or [1.0] * len(self.reward_fns))
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.cursor, self.seed = [], 0, seed
        self.buffer, self.uses = None, 0
        self.sampling = SamplingConfig(max_new_tokens=m.max_new_tokens, temperature=m.temperature,
                                       top_k=m.get("top_k", 0), top_p=m.get("top_p", 1.0), min_p=m.get("min_p", 0.0))

    def _prompts(self, n: int) -> list[dict]:
        """This rank's `n` prompts: every rank draws the same n × world (one seeded order) and keeps
        its share, so N processes split exactly the prompts one process with N times as many draws."""
        out = []
        while len(out) < n * self.world:
            if self.cursor >= len(self.order):
                self.order, self.cursor = torch.randperm(len(self.rows), generator=self.gen).tolist(), 0
            out.append(self.rows[self.order[self.cursor]])
            self.cursor += 1
        return out[self.rank::self.world]

    def state_dict(self) -> dict:
        """The data and sampling position a checkpoint stores (for an exact resume)."""
        return {"gen": self.gen.get_state(), "order": list(self.order), "cursor": self.cursor, "seed": self.seed,
                "buffer": self.buffer, "uses": self.uses}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.cursor, self.seed = list(state["order"]), state["cursor"], state["seed"]
        self.buffer, self.uses = state["buffer"], state["uses"]

    def _rewards(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict]:
        """The weighted total reward of each completion, and each function's rewards by name."""
        G = self.m.num_generations
        if self.offline:  # given groups: the seeds' `score`, or RLVR's `correct` flag as 1/0
            r = torch.tensor([float(x["score"]) if "score" in x else float(x["correct"]) for row in rows
                              for x in row["responses"]], dtype=torch.float32)
            return r, {"given": r}
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        fields = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        total, parts = torch.zeros(len(texts)), {}
        for fn, w in zip(self.reward_fns, self.weights):
            parts[fn.reward_name] = torch.tensor(fn(prompts, texts, **fields), dtype=torch.float32)
            total += w * parts[fn.reward_name]
        return total, parts

    def _given(self, model, rows: list[dict], ids: list[list[int]]) -> Rollout:
        """Offline groups: the given responses as completions (+ eos), scored by the current policy
        for the old log-probs (so the first step is on-policy, ratio 1)."""
        tok, G = self.tok, self.m.num_generations
        comps = []
        for r in rows:
            if len(r["responses"]) != G:
                raise ValueError(f"prompt {r['prompt'][:40]!r} has {len(r['responses'])} responses; "
                                 f"set method.num_generations={len(r['responses'])} (every group must have G)")
            comps += [(tok.encode(x["text"]) + tok.stop_token_ids[:1])[:self.m.max_new_tokens] for x in r["responses"]]
        width = max(len(c) for c in comps)
        completion = torch.full((len(comps), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(comps), width)
        for i, c in enumerate(comps):
            completion[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1
        plens = [len(p) for p in ids for _ in range(G)]
        seqs = [p + c for p, c in zip([p for p in ids for _ in range(G)], comps)]
        old = completion_logprobs(model, plens, seqs, width, tok.pad_token_id, self.m.temperature).cpu() * mask
        return Rollout(prompt_ids=ids, completion_ids=completion, logprobs=old, mask=mask,
                       truncated=torch.zeros(len(comps), dtype=torch.bool))

    @torch.no_grad()
    def collect(self, model) -> dict:
        """Generate, score and keep one generation batch (dynamic sampling when enabled)."""
        m, tok, G = self.m, self.tok, self.m.num_generations
        t0 = time.perf_counter()
        kept, dropped, rounds = [], 0, 0
        scored = {}  # each reward function's values over every sampling round (dropped groups included)
        while len(kept) < m.prompts_per_step and rounds <= m.get("max_resample", 0):
            rows = self._prompts(m.prompts_per_step - len(kept))
            ids = [tokenize_prompt(r["prompt"], tok) for r in rows]
            self.seed += 1
            if self.offline:
                roll = self._given(model, rows, ids)
            else:
                roll = generate(model, ids, self.sampling, tok.stop_token_ids, tok.pad_token_id,
                                num_samples=G, seed=self.seed * self.world + self.rank, tokenizer=tok)
            texts = roll.texts(tok)
            rewards, parts = self._rewards(rows, texts)
            for name, r in parts.items():
                scored[name] = torch.cat([scored[name], r]) if name in scored else r
            lengths = roll.mask.sum(1)
            if m.get("overlong_cache"):
                rewards = rewards + overlong_penalty(lengths, m.max_new_tokens, m.overlong_cache)
            keep = dynamic_sampling_keep(rewards, G) if m.get("dynamic_sampling") else torch.ones(len(rows), dtype=torch.bool)
            dropped += int((~keep).sum())
            for i in range(len(rows)):
                if keep[i]:
                    sl = slice(i * G, (i + 1) * G)
                    kept.append({"prompt_ids": ids[i], "completion_ids": roll.completion_ids[sl].cpu(),
                                 "old_logps": roll.logprobs[sl].cpu(), "mask": roll.mask[sl].cpu(),
                                 "truncated": roll.truncated[sl].cpu(), "rewards": rewards[sl], "texts": texts[sl]})
            rounds += 1
        metrics = {f"rewards/{name}/{stat}": v for name, r in scored.items()
                   for stat, v in (("mean", r.mean().item()), ("std", r.std().item() if len(r) > 1 else 0.0))}
        if not kept:  # every group tied even after resampling: train on nothing rather than crash
            return {"rows": [], "metrics": {**metrics, "dynamic_sampling/dropped": dropped, "rollout_s": time.perf_counter() - t0}}
        rewards = torch.cat([g["rewards"] for g in kept])
        adv = group_advantages(rewards, G, m.scale_rewards)
        width = max(g["completion_ids"].shape[1] for g in kept)
        rows = []
        for gi, g in enumerate(kept):
            for j in range(G):
                n = int(g["mask"][j].sum())
                mask = torch.zeros(width)
                mask[:g["mask"].shape[1]] = g["mask"][j]
                if m.get("mask_truncated_completions") and g["truncated"][j]:
                    mask.zero_()
                old = torch.zeros(width)
                old[:g["old_logps"].shape[1]] = g["old_logps"][j]
                rows.append({"seq": g["prompt_ids"] + g["completion_ids"][j, :n].tolist(),
                             "prompt_len": len(g["prompt_ids"]), "old_logps": old, "mask": mask,
                             "advantage": adv[gi * G + j]})
        lengths = torch.tensor([float(g["mask"][j].sum()) for g in kept for j in range(G)])
        groups = rewards.view(-1, G)
        metrics.update({
            "reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": (groups.std(1) == 0).float().mean().item() if G > 1 else 1.0,
            "completion_length/mean": lengths.mean().item(), "completion_length/min": lengths.min().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_ratio": torch.cat([g["truncated"] for g in kept]).float().mean().item(),
            "dynamic_sampling/dropped": dropped, "rollout_s": time.perf_counter() - t0,
        })
        return {"rows": rows, "metrics": metrics}

    def step(self, model) -> tuple[list[list[dict]], dict]:
        """The micro-batches for this optimiser step and the rollout metrics (fresh every num_iterations steps)."""
        if self.buffer is None or self.uses >= self.m.num_iterations:
            self.buffer, self.uses = self.collect(model), 0
        self.uses += 1
        rows, mb = self.buffer["rows"], self.m.micro_batch_size
        return [rows[i:i + mb] for i in range(0, len(rows), mb)], dict(self.buffer["metrics"])


def rollout_loss_inputs(model, ref, rows: list[dict], tok, device, temperature: float, n_items: float,
                        max_completion_length: int | None = None):
    """Inputs of grpo_loss for a micro-batch of rollout rows (current, old and reference log-probs),
    the number of tokens run, and the policy entropy on the completion tokens.

    `max_completion_length` (the configured max_new_tokens) is dr_grpo's constant normaliser; without
    it grpo_loss would divide by this batch's longest completion, which changes from step to step."""
    width = rows[0]["mask"].shape[0]
    seqs, plens = [r["seq"] for r in rows], [r["prompt_len"] for r in rows]
    # one prompt prefill per group (same values); a plain padded forward under gradient checkpointing
    logprobs = completion_logprobs if getattr(model, "gradient_checkpointing", False) else shared_prompt_logprobs
    logps, ent = logprobs(model, plens, seqs, width, tok.pad_token_id, temperature, with_entropy=True)
    mask = torch.stack([r["mask"] for r in rows]).to(device)
    inputs = {"logps": logps, "old_logps": torch.stack([r["old_logps"] for r in rows]).to(device), "mask": mask,
              "advantages": torch.stack([r["advantage"] for r in rows]).to(device),
              "num_items_in_batch": n_items}
    if max_completion_length is not None:
        inputs["max_completion_length"] = max_completion_length
    if ref is not None:
        with torch.no_grad():
            inputs["ref_logps"] = shared_prompt_logprobs(ref, plens, seqs, width, tok.pad_token_id, temperature)
    return inputs, sum(len(s) for s in seqs), {"entropy": float(masked_mean(ent.detach(), mask))}


def micro_batch_shares(micro_batches: list[list[dict]], loss_type: str = "grpo") -> list[float]:
    """The factor on each micro-batch's loss so that the accumulated gradient is the whole batch's.

    grpo_loss normalises inside the micro-batch it is given: grpo and dr_grpo by its number of
    sequences, bnpo by its completion tokens. So each micro-batch counts by its share of the rows
    (of the completion tokens for bnpo). A flat 1/k is right only for equal micro-batches: with rows
    not a multiple of micro_batch_size (or fewer groups left by dynamic sampling) it gives each row
    of a short last micro-batch more weight than the others. dapo divides by num_items_in_batch (the
    whole batch's tokens) already and takes 1 for every micro-batch; it is not handled here.
    """
    if loss_type == "dapo":
        raise ValueError("dapo losses are normalised by num_items_in_batch; their micro-batches take scale 1")
    if loss_type == "bnpo":
        sizes = [sum(float(r["mask"].sum()) for r in mb) for mb in micro_batches]
    else:
        sizes = [float(len(mb)) for mb in micro_batches]
    total = sum(sizes)
    return [s / total for s in sizes] if total > 0 else [1.0 / max(len(sizes), 1)] * len(sizes)
