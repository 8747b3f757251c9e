"""Kind `rollouts`: the policy-gradient methods (GRPO, DAPO, Dr.GRPO, RLVR, offline groups).

One generation batch, top to bottom (`collect`):
  1. prompts: `prompts_per_step` of them, this rank's share of one seeded order;
  2. rollout: `num_generations` samples each on the KV-cached sampler (one prefill per prompt, the
     samples share it), which also returns the log-probs of the sampled tokens: the "old" policy of
     the clipped surrogate, so no second forward is needed while the policy has not changed;
     offline groups (the seeds' scored `responses`, RLVR `correct` flags) are tokenized instead and
     scored by one no-grad forward;
  3. rewards: the registered functions (rollout/rewards.py, tasks/) summed with `reward_weights`,
     plus DAPO's soft overlong penalty; dynamic sampling drops groups whose rewards all tie and
     draws more prompts, up to `max_resample` extra rounds;
  4. advantages: `method.advantage` from the registry in losses/advantages.py: grpo (group-relative,
     the default), rloo (leave-one-out), reinforce_plus_plus(_baseline) (batch-normalised, over every
     rank's rewards); `reward_kl` first folds β·KL(π_old‖π_ref) of each sample into its reward (RLOO);
  5. episodes: one typed row per completion (rollout/episode.py).
The batch is reused for `num_iterations` optimiser steps (GRPO's μ): the first is exactly on-policy
(ratio 1), later ones are clipped against the kept old log-probs. Each micro-batch's loss inputs are
one training forward (`loss_inputs`): current log-probs (one prompt prefill per group), the old ones,
the reference's when the loss uses a KL term.

How micro-batches are weighted is the loss's normaliser (`loss.normaliser(**loss_args)`): a loss
that is a mean over sequences counts each micro-batch by its share of the rows, a token mean by its
share of the completion tokens, and a loss already divided by the whole batch's token count (DAPO's
`num_items_in_batch`, summed over ranks) counts 1 per micro-batch, times the number of ranks because
FSDP averages gradients over them.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from data.formats import read_jsonl, read_prompts, tokenize_prompt
from losses.common import masked_mean
from losses.advantages import get_advantage, kl_in_reward
from losses.grpo import dynamic_sampling_keep, overlong_penalty
from rollout.episode import Episode, stack
from rollout.sampler import Rollout, SamplingConfig, generate
from trainer import distributed
from trainer.config import ConfigError, TrainMethod, opt, register_options
from trainer.feeds import Feed, Step, register_feed
from trainer.forward import completion_logprobs, policy_logprobs, shared_prompt_logprobs
from trainer.paths import repo_path


@dataclass
class SampledMethod(TrainMethod):
    """What every on-line RL kind shares: prompts, rewards and the sampler."""
    reward: list[str] = opt(["math_answer", "format"], "registered reward functions (rollout/rewards.py)")
    reward_weights: list[float] | None = opt(None, "weight of each reward in the total (null: 1 each)")
    reward_model: str | None = opt(None, "with reward: [reward_model]: a checkpoint written by method=reward")
    prompt_field: str = opt("prompt", "the column holding the prompt (RLVR: problem)")
    num_generations: int = opt(8, "G: samples per prompt (one prefill shared by them)", min=1)
    prompts_per_step: int = opt(16, "prompts per generation batch and process", min=1)
    max_new_tokens: int = opt(16, "tokens per completion at most", min=1)
    temperature: float = opt(1.0, "sampling temperature (the training forward uses the same)", min=0, min_exclusive=True)
    micro_batch_size: int = opt(64, "rollout rows per forward/backward", min=1)
    max_steps: int | None = opt(80, "optimiser steps", min=1)
    betas: list[float] = opt([0.9, 0.99], "AdamW (beta1, beta2)")
    warmup_ratio: float = opt(0.0, "share of the steps spent warming up linearly", min=0, max=1)
    min_lr_ratio: float = opt(1.0, "cosine decays to lr x min_lr_ratio (1.0: constant)", min=0, max=1)

    def check(self, where: str) -> None:
        super().check(where)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"{where}.reward_weights: {len(self.reward_weights)} weights for {len(self.reward)} "
                              f"rewards {self.reward}; give one weight per reward (or null for 1 each)")
        if "reward_model" in self.reward and not self.reward_model:
            raise ConfigError(f"{where}.reward_model: reward [reward_model] needs method.reward_model=DIR")


@register_options("rollouts")
@dataclass
class RolloutMethod(SampledMethod):
    """GRPO family: sampled groups, group-relative advantages, clipped surrogate."""
    top_k: int = opt(0, "sampling: keep the k most likely tokens (0: off)", min=0)
    top_p: float = opt(1.0, "sampling: nucleus mass (1: off)", min=0, max=1, min_exclusive=True)
    min_p: float = opt(0.0, "sampling: drop tokens below min_p x the top probability (0: off)", min=0, max=1)
    num_iterations: int = opt(1, "μ: optimiser steps per generation batch (old log-probs kept)", min=1)
    advantage: str = opt("grpo", "advantage estimator (losses/advantages.py): grpo, rloo, reinforce_plus_plus, "
                                 "reinforce_plus_plus_baseline")
    advantage_args: dict[str, Any] = opt({}, "keyword arguments of the estimator (e.g. rloo: {normalize: true})")
    scale_rewards: Literal["group", "batch", "none"] = opt("group", "grpo estimator: advantage std per group, over the "
                                                                    "batch, or none")
    reward_kl: float = opt(0.0, "β of a KL penalty folded into each completion's reward (RLOO as TRL does it; "
                                "needs reference: true)", min=0)
    mask_truncated_completions: bool = opt(False, "completions that hit max_new_tokens are not trained on")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards all tie, draw more prompts")
    max_resample: int = opt(0, "extra sampling rounds per step at most (dynamic sampling)", min=0)
    overlong_cache: int = opt(0, "DAPO soft overlong penalty over the last N tokens before max_new_tokens (0: off)",
                              min=0)

    def check(self, where: str) -> None:
        super().check(where)
        if self.reward_kl > 0 and not self.reference:
            raise ConfigError(f"{where}.reward_kl: a KL penalty in the reward needs the reference (method.reference=true)")
        from losses.advantages import get_advantage

        try:
            get_advantage(self.advantage)
        except ValueError as e:
            raise ConfigError(f"{where}.advantage: {e}") from None
        if self.overlong_cache > self.max_new_tokens:
            raise ConfigError(f"{where}.overlong_cache: {self.overlong_cache} is more than max_new_tokens "
                              f"{self.max_new_tokens}")


def reward_functions(m: SampledMethod) -> tuple[list, list[float]]:
    from rollout.rewards import get_rewards, reward_model_reward

    fns = [reward_model_reward(m.reward_model) if name == "reward_model" else get_rewards([name])[0]
           for name in m.reward]
    return fns, list(m.reward_weights or [1.0] * len(fns))


def loss_normaliser(loss_fn, loss_args: dict) -> str:
    """'sequences', 'tokens' or 'batch': what the loss divides by (declared by the loss; sequences by default)."""
    rule = getattr(loss_fn, "normaliser", "sequences")
    rule = rule(**loss_args) if callable(rule) else rule
    if rule not in ("sequences", "tokens", "batch"):
        raise ValueError(f"{loss_fn.__name__}.normaliser gave {rule!r}; expected sequences, tokens or batch")
    return rule


def micro_batch_weights(micro_batches: list[list[Episode]], rule: str, world: int = 1) -> list[float]:
    """The factor on each micro-batch's loss so that the accumulated gradient is the whole batch's.

    A loss normalised inside its micro-batch (by rows, or by completion tokens) counts by that
    micro-batch's share: a flat 1/k is right only for equal micro-batches, and with rows not a multiple
    of micro_batch_size (or fewer groups left by dynamic sampling) it would give each row of a short
    last micro-batch more weight than the others. A loss normalised by the whole batch counts 1.
    """
    if rule == "batch":
        return [float(world)] * len(micro_batches)
    if rule == "tokens":
        sizes = [sum(float(e.mask.sum()) for e in mb) for mb in micro_batches]
    else:
        sizes = [float(len(mb)) for mb in micro_batches]
    total = sum(sizes)
    return [s / total for s in sizes] if total > 0 else [1.0 / max(len(sizes), 1)] * len(sizes)


class PromptFeed(Feed):
    """Prompts drawn in a seeded order and split over ranks, and the rewards of their completions."""

    progress_metrics = ("reward",)

    def __init__(self, cfg, tok, device, rank: int = 0, world: int = 1):
        super().__init__(cfg, tok, device, rank, world)
        self.reward_fns, self.weights = reward_functions(self.m)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order, self.cursor, self.seed = [], 0, cfg.seed
        self.normaliser = loss_normaliser(self.loss_fn, self.m.loss_args)

    def load(self, model, run_dir: str) -> None:
        """The prompt file, validated (every row has the columns the rewards read; offline groups
        have num_generations responses each); every prompt tokenized once, cut from the left to
        data.max_length tokens (counted and reported on one line)."""
        m, n = self.m, self.cfg.data.max_length
        path = repo_path(self.cfg.data.train or m.train_file or self.cfg.data.files.get(m.data_format))
        if path is None:
            raise ConfigError(f"no training file: set data.train=FILE (format {m.data_format!r})")
        rows = read_prompts(path, m.data_format, self.tok, n, field=m.prompt_field, group_size=m.num_generations)[0]
        self.offline = "responses" in rows[0]
        need = sorted({c for fn in self.reward_fns for c in getattr(fn, "columns", ())})
        if not self.offline and any(r.get(c) is None for r in rows for c in need):
            read_jsonl(path, m.data_format, require=need)  # the error names the first line without one
        if m.prompt_field != "prompt":  # e.g. RLVR's `problem`: the reward functions see it as the prompt
            rows = [{**{k: v for k, v in r.items() if k != m.prompt_field}, "prompt": r[m.prompt_field]} for r in rows]
        self.prompt_ids = [tokenize_prompt(r["prompt"], self.tok, n) for r in rows]
        self.rows = rows

    def draw(self, n: int) -> list[int]:
        """This rank's `n` prompt indices: every rank draws the same n x world (one seeded order) and
        keeps its share, so N processes split exactly the prompts one process with N times as many draws."""
        out = []
        while len(out) < n * self.world:
            if self.cursor >= len(self.order):
                self.order, self.cursor = torch.randperm(len(self.rows), generator=self.gen).tolist(), 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out[self.rank::self.world]

    def rewards(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict]:
        """The weighted total reward of each completion (G per row), and each function's rewards by name."""
        G = self.m.num_generations
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        fields = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        total, parts = torch.zeros(len(texts)), {}
        for fn, w in zip(self.reward_fns, self.weights):
            parts[fn.reward_name] = torch.tensor(fn(prompts, texts, **fields), dtype=torch.float32)
            total += w * parts[fn.reward_name]
        return total, parts

    def sampling(self) -> SamplingConfig:
        m = self.m
        return SamplingConfig(max_new_tokens=m.max_new_tokens, temperature=m.temperature,
                              top_k=getattr(m, "top_k", 0), top_p=getattr(m, "top_p", 1.0),
                              min_p=getattr(m, "min_p", 0.0))

    def describe(self, micro) -> str:
        return f"{len(micro)} sequences x {max((len(e.seq) for e in micro), default=0)} tokens"

    def memory_hints(self) -> list[str]:
        return [f"method.micro_batch_size={max(1, self.m.micro_batch_size // 2)} (rollout rows per forward)"]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order), "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.cursor, self.seed = list(state["order"]), state["cursor"], state["seed"]

    @property
    def total_steps(self) -> int:
        return self.m.max_steps


@register_feed("rollouts")
class RolloutFeed(PromptFeed):
    def __init__(self, cfg, tok, device, rank: int = 0, world: int = 1):
        super().__init__(cfg, tok, device, rank, world)
        self.batch, self.uses = None, 0

    def given(self, model, rows: list[dict], ids: list[list[int]]) -> Rollout:
        """Offline groups: the given responses as completions (+ eos), scored by the current policy
        for the old log-probs (so the first step is on-policy, ratio 1)."""
        tok, G = self.tok, self.m.num_generations
        comps = []
        for r in rows:
            if len(r["responses"]) != G:
                raise ConfigError(f"prompt {r['prompt'][:40]!r} has {len(r['responses'])} responses; "
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

    def given_rewards(self, rows: list[dict]) -> tuple[torch.Tensor, dict]:
        """Offline groups: the seeds' `score`, or RLVR's `correct` flag as 1/0."""
        r = torch.tensor([float(x["score"]) if "score" in x else float(x["correct"]) for row in rows
                          for x in row["responses"]], dtype=torch.float32)
        return r, {"given": r}

    @torch.no_grad()
    def collect(self, model) -> tuple[list[Episode], dict]:
        """One generation batch: prompts -> rollout -> rewards -> advantages -> episodes."""
        m, tok, G = self.m, self.tok, self.m.num_generations
        t0 = time.perf_counter()
        kept, dropped, rounds, scored = [], 0, 0, {}
        while len(kept) < m.prompts_per_step and rounds <= m.max_resample:
            picked = self.draw(m.prompts_per_step - len(kept))
            rows, ids = [self.rows[i] for i in picked], [self.prompt_ids[i] for i in picked]
            self.seed += 1
            if self.offline:
                roll = self.given(model, rows, ids)
                rewards, parts = self.given_rewards(rows)
            else:
                roll = generate(model, ids, self.sampling(), tok.stop_token_ids, tok.pad_token_id,
                                num_samples=G, seed=self.seed * self.world + self.rank, tokenizer=tok)
                rewards, parts = self.rewards(rows, roll.texts(tok))
            for name, r in parts.items():  # every round's scores, dropped groups included
                scored[name] = torch.cat([scored[name], r]) if name in scored else r
            if m.overlong_cache:
                rewards = rewards + overlong_penalty(roll.mask.sum(1), m.max_new_tokens, m.overlong_cache)
            keep = dynamic_sampling_keep(rewards, G) if m.dynamic_sampling else torch.ones(len(rows), dtype=torch.bool)
            dropped += int((~keep).sum())
            for i in range(len(rows)):
                if keep[i]:
                    sl = slice(i * G, (i + 1) * G)
                    kept.append((ids[i], roll.completion_ids[sl].cpu(), roll.logprobs[sl].cpu(), roll.mask[sl].cpu(),
                                 roll.truncated[sl].cpu(), rewards[sl]))
            rounds += 1
        metrics = {f"rewards/{name}/{stat}": v for name, r in scored.items()
                   for stat, v in (("mean", r.mean().item()), ("std", r.std().item() if len(r) > 1 else 0.0))}
        metrics["dynamic_sampling/dropped"] = dropped
        if not kept:  # every group tied even after resampling: train on nothing rather than crash
            return [], {**metrics, "rollout_s": time.perf_counter() - t0}
        rewards = torch.cat([g[5] for g in kept])
        width = max(g[1].shape[1] for g in kept)
        if m.reward_kl > 0:  # r - β Σ_t (log π_old - log π_ref) on the sampled tokens, before any estimator
            rewards = self.reward_with_kl(rewards, kept, width)
        adv = self.advantages(rewards)
        episodes = []
        for gi, (prompt, comp, old, mask, truncated, _) in enumerate(kept):
            for j in range(G):
                n = int(mask[j].sum())
                row_mask, row_old = torch.zeros(width), torch.zeros(width)
                row_mask[:mask.shape[1]] = mask[j]
                row_old[:old.shape[1]] = old[j]
                if m.mask_truncated_completions and truncated[j]:
                    row_mask.zero_()
                episodes.append(Episode(seq=prompt + comp[j, :n].tolist(), prompt_len=len(prompt), mask=row_mask,
                                        old_logps=row_old, advantage=adv[gi * G + j],
                                        reward=float(rewards[gi * G + j])))
        lengths = torch.tensor([float(g[3][j].sum()) for g in kept for j in range(G)])
        groups = rewards.view(-1, G)
        metrics.update({
            "reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": (groups.std(1) == 0).float().mean().item() if G > 1 else 1.0,
            "completion_length/mean": lengths.mean().item(), "completion_length/min": lengths.min().item(),
            "completion_length/max": lengths.max().item(),
            "truncated_ratio": torch.cat([g[4] for g in kept]).float().mean().item(),
            "rollout_s": time.perf_counter() - t0,
        })
        return episodes, metrics

    def use_reference(self, ref):
        self.ref = ref
        return ref

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """The configured estimator over the whole step's rewards (every rank's, so batch statistics are
        the global batch's under torchrun); this rank's part."""
        m, fn = self.m, get_advantage(self.m.advantage)
        kwargs = {"scale_rewards": m.scale_rewards} if "scale_rewards" in inspect.signature(fn).parameters else {}
        everyone, start = distributed.gather(rewards)
        return fn(everyone, m.num_generations, **{**kwargs, **m.advantage_args})[start:start + len(rewards)]

    def reward_with_kl(self, rewards: torch.Tensor, kept: list, width: int) -> torch.Tensor:
        seqs, plens, old, mask = [], [], torch.zeros(len(rewards), width), torch.zeros(len(rewards), width)
        for gi, (prompt, comp, lp, mk, _, _) in enumerate(kept):
            for j in range(self.m.num_generations):
                k, n = gi * self.m.num_generations + j, int(mk[j].sum())
                seqs.append(prompt + comp[j, :n].tolist())
                plens.append(len(prompt))
                old[k, :lp.shape[1]], mask[k, :mk.shape[1]] = lp[j], mk[j]
        ref = shared_prompt_logprobs(self.ref, plens, seqs, width, self.tok.pad_token_id, self.m.temperature).cpu()
        return kl_in_reward(rewards, old, ref, mask, self.m.reward_kl)

    def next_step(self, model) -> Step:
        """This step's micro-batches (a fresh generation batch every num_iterations steps)."""
        if self.batch is None or self.uses >= self.m.num_iterations:
            self.batch, self.uses = self.collect(model), 0
        self.uses += 1
        episodes, metrics = self.batch
        mb = self.m.micro_batch_size
        micro = [episodes[i:i + mb] for i in range(0, len(episodes), mb)]
        self.num_items = distributed.total(sum(float(e.mask.sum()) for e in episodes))
        return Step(micro, micro_batch_weights(micro, self.normaliser, self.world), dict(metrics))

    def loss_inputs(self, model, ref, micro: list[Episode]):
        """grpo_loss's inputs for a micro-batch: current, old and reference log-probs, mask, advantages,
        the whole batch's completion tokens (dapo) and the configured completion length (dr_grpo)."""
        tok, dev = self.tok, self.device
        width = micro[0].mask.shape[0]
        seqs, plens = [e.seq for e in micro], [e.prompt_len for e in micro]
        logps, ent = policy_logprobs(model, plens, seqs, width, tok.pad_token_id, self.m.temperature, with_entropy=True)
        mask = stack(micro, "mask", dev)
        inputs = {"logps": logps, "old_logps": stack(micro, "old_logps", dev), "mask": mask,
                  "advantages": stack(micro, "advantage", dev), "num_items_in_batch": self.num_items,
                  "max_completion_length": self.m.max_new_tokens}
        if ref is not None:
            with torch.no_grad():
                inputs["ref_logps"] = shared_prompt_logprobs(ref, plens, seqs, width, tok.pad_token_id,
                                                             self.m.temperature)
        return inputs, sum(len(s) for s in seqs), {"entropy": float(masked_mean(ent.detach(), mask))}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.batch is not None:
            state["batch"] = {"episodes": [e.to_state() for e in self.batch[0]], "metrics": self.batch[1]}
        return {**state, "uses": self.uses}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        b = state.get("batch")
        self.batch = ([Episode.from_state(e) for e in b["episodes"]], b["metrics"]) if b else None
        self.uses = state["uses"]
