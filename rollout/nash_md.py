"""Rollout batches for Nash-MD (losses/nash_md.py): the policy against the policy/reference mixture.

Each optimiser step draws `prompts_per_step` prompts and, for each, `num_generations` pairs:
    y  ~ π(·|x)       on the KV-cached sampler (rollout/sampler.py `generate`)
    y' ~ π_mix(·|x)   the same sampler with the reference running in lockstep (`mixture_model`),
                      log π_mix = log_softmax((1 − c)·log π + c·log π_ref), c = `mixture_coef`
and scores both with the registered reward functions (rollout/rewards.py, summed with
`reward_weights`). Sample j of y is paired with sample j of y'. The preference P(y ≻ y') is
    compare  1 if r(y) > r(y'), ½ on a tie, 0 otherwise   (verifiable rewards, e.g. math_answer)
    sigmoid  σ(r(y) − r(y'))                              (a reward model: Bradley–Terry, TRL's path)
`preference: auto` (the default) is sigmoid when the rewards include `reward_model`, else compare.

Only y is trained on: `nash_md_loss_inputs` runs the policy on prompt + y with gradient and the
reference without, at the sampling temperature, and hands nash_md_loss (policy_logps, ref_logps,
mask, preference). y' is only the opponent; its tokens never enter the loss. The batch is fresh every
step (Nash-MD is on-policy; there is no clipped reuse as in GRPO's num_iterations).
"""
from __future__ import annotations

import time

import torch

from data.formats import tokenize_prompt
from losses.common import masked_mean
from losses.nash_md import preference_probability
from rollout.rl import RolloutSource, completion_logprobs
from rollout.sampler import generate


def compare_preference(r_policy: torch.Tensor, r_mixture: torch.Tensor) -> torch.Tensor:
    """P(y ≻ y') from exact scores: 1 if r(y) > r(y'), ½ on a tie, 0 otherwise."""
    return 0.5 + 0.5 * torch.sign(r_policy - r_mixture)


class NashMDSource(RolloutSource):
    """Yields the micro-batches of each optimiser step for kind `nash_md` (prompts and rewards as
    RolloutSource; `ref` is the reference of the mixture: a frozen copy or the adapters-disabled base)."""

    def __init__(self, rows: list[dict], tok, cfg, seed: int, ref, rank: int = 0, world: int = 1):
        if ref is None:
            raise ValueError("method=nash_md samples y' from a mixture with the reference model: set method.reference=true")
        super().__init__(rows, tok, cfg, seed, rank=rank, world=world)
        if self.offline:
            raise ValueError("method=nash_md generates its own pairs: the prompt file must not carry `responses`")
        self.ref = ref
        self.coef = float(cfg.get("mixture_coef", 0.5))
        if not 0.0 <= self.coef <= 1.0:
            raise ValueError(f"method.mixture_coef must be in [0, 1], got {self.coef}")
        mode = cfg.get("preference", "auto")
        if mode == "auto":
            mode = "sigmoid" if "reward_model" in list(cfg.reward) else "compare"
        if mode not in ("compare", "sigmoid"):
            raise ValueError(f"method.preference must be auto, compare or sigmoid, got {mode!r}")
        self.mode = mode

    def _score(self, rows: list[dict], texts: list[str], tag: str) -> tuple[torch.Tensor, dict]:
        """RolloutSource's weighted total reward, with each function's mean as rewards/NAME/`tag`."""
        total, parts = self._rewards(rows, texts)
        return total, {f"rewards/{name}/{tag}": r.mean().item() for name, r in parts.items()}

    @torch.no_grad()
    def collect(self, model) -> dict:
        """Sample y and y' for one batch of prompts, score them and build the loss rows."""
        m, tok, G = self.m, self.tok, self.m.num_generations
        t0 = time.perf_counter()
        rows = self._prompts(m.prompts_per_step)  # this rank's share of the step's prompts
        ids = [tokenize_prompt(r["prompt"], tok) for r in rows]
        self.seed += 1
        seed = self.seed * self.world + self.rank
        y = generate(model, ids, self.sampling, tok.stop_token_ids, tok.pad_token_id, num_samples=G,
                     seed=seed, tokenizer=tok)
        y_mix = generate(model, ids, self.sampling, tok.stop_token_ids, tok.pad_token_id, num_samples=G,
                         seed=seed + 1_000_003, tokenizer=tok, mixture_model=self.ref, mixture_coef=self.coef)
        r_pol, metrics = self._score(rows, y.texts(tok), "mean")
        r_mix, mix_metrics = self._score(rows, y_mix.texts(tok), "mixture")
        metrics.update(mix_metrics)
        pref = preference_probability(r_pol, r_mix) if self.mode == "sigmoid" else compare_preference(r_pol, r_mix)
        out = []
        for i in range(len(rows)):
            for j in range(G):
                k = i * G + j
                n = int(y.mask[k].sum())
                out.append({"seq": ids[i] + y.completion_ids[k, :n].tolist(), "prompt_len": len(ids[i]),
                            "mask": y.mask[k].cpu(), "preference": pref[k]})
        lengths = y.mask.sum(1)
        metrics.update({
            "reward": r_pol.mean().item(), "reward_mixture": r_mix.mean().item(),
            "win_rate": (r_pol > r_mix).float().mean().item(), "tie_rate": (r_pol == r_mix).float().mean().item(),
            "completion_length/mean": lengths.mean().item(), "completion_length/mixture": y_mix.mask.sum(1).mean().item(),
            "truncated_ratio": y.truncated.float().mean().item(), "rollout_s": time.perf_counter() - t0,
        })
        return {"rows": out, "metrics": metrics}

    def step(self, model) -> tuple[list[list[dict]], dict]:
        """The micro-batches for this optimiser step (a fresh on-policy batch every step) and its metrics."""
        batch = self.collect(model)
        rows, mb = batch["rows"], self.m.micro_batch_size
        return [rows[i:i + mb] for i in range(0, len(rows), mb)], batch["metrics"]


def nash_md_loss_inputs(model, ref, rows: list[dict], tok, device, temperature: float = 1.0):
    """Inputs of nash_md_loss for a micro-batch of Nash-MD rows: policy log-probs of y (with gradient),
    reference log-probs of y (without), the completion mask and P(y ≻ y'); plus the number of tokens
    run and the policy entropy on the completion tokens."""
    width = rows[0]["mask"].shape[0]
    seqs, plens = [r["seq"] for r in rows], [r["prompt_len"] for r in rows]
    logps, ent = completion_logprobs(model, plens, seqs, width, tok.pad_token_id, temperature, with_entropy=True)
    mask = torch.stack([r["mask"] for r in rows]).to(device)
    with torch.no_grad():
        ref_logps = completion_logprobs(ref, plens, seqs, width, tok.pad_token_id, temperature)
    inputs = {"policy_logps": logps, "ref_logps": ref_logps, "mask": mask,
              "preference": torch.stack([r["preference"] for r in rows]).to(device=device, dtype=logps.dtype)}
    return inputs, sum(len(s) for s in seqs), {"entropy": float(masked_mean(ent.detach(), mask))}
