"""Kind `nash_md`: Nash-MD (losses/nash_md.py), the policy against the policy/reference mixture.

Each optimiser step, top to bottom (`collect`): `prompts_per_step` prompts and, for each,
`num_generations` pairs:
    y  ~ π(·|x)       on the KV-cached sampler
    y' ~ π_mix(·|x)   the same sampler with the reference in lockstep (`mixture_model`),
                      log π_mix = log_softmax((1 − c)·log π + c·log π_ref), c = `mixture_coef`
both scored by the registered rewards (summed with `reward_weights`); sample j of y is paired with
sample j of y'. The preference P(y ≻ y') is
    compare  1 if r(y) > r(y'), ½ on a tie, 0 otherwise   (verifiable rewards, e.g. math_answer)
    sigmoid  σ(r(y) − r(y'))                              (a reward model: Bradley–Terry, TRL's path)
`preference: auto` is sigmoid when the rewards include `reward_model`, else compare. Only y is
trained on: the loss inputs are the policy's log-probs of y (with gradient), the reference's
(without), the mask and P. The batch is fresh every step (Nash-MD is on-policy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from losses.common import masked_mean
from losses.nash_md import preference_probability
from rollout.sampler import generate
from trainer.config import ConfigError, opt, register_options
from trainer.feeds import Step, register_feed
from trainer.feeds.rollouts import PromptFeed, SampledMethod, micro_batch_weights
from trainer.forward import completion_logprobs


@register_options("nash_md")
@dataclass
class NashMDMethod(SampledMethod):
    """Nash-MD: policy samples against geometric policy/reference mixture samples."""
    reward: list[str] = opt(["math_answer"], "registered reward functions (or [reward_model])")
    reference: bool = opt(True, "the mixture and the KL term need the reference")
    preference: Literal["auto", "compare", "sigmoid"] = opt("auto", "how P(y beats y') comes from the rewards")
    mixture_coef: float = opt(0.5, "c: weight of the reference in the geometric mixture (TRL default)", min=0, max=1)
    num_generations: int = opt(4, "(y, y') pairs per prompt", min=1)
    prompts_per_step: int = opt(32, "prompts per step and process", min=1)

    def check(self, where: str) -> None:
        super().check(where)
        if not self.reference:
            raise ConfigError(f"{where}.reference: Nash-MD samples y' from a mixture with the reference model; "
                              "it must be true")


@dataclass
class PolicySample:
    """One y of a (y, y') pair: what nash_md_loss trains on."""
    seq: list[int]
    prompt_len: int
    mask: torch.Tensor       # (width,)
    preference: torch.Tensor  # () P(y beats y')


def compare_preference(r_policy: torch.Tensor, r_mixture: torch.Tensor) -> torch.Tensor:
    """P(y ≻ y') from exact scores: 1 if r(y) > r(y'), ½ on a tie, 0 otherwise."""
    return 0.5 + 0.5 * torch.sign(r_policy - r_mixture)


@register_feed("nash_md")
class NashMDFeed(PromptFeed):
    def load(self, model, run_dir: str) -> None:
        super().load(model, run_dir)
        if self.offline:
            raise ConfigError("method=nash_md generates its own pairs: the prompt file must not carry `responses`")
        mode = self.m.preference
        self.mode = ("sigmoid" if "reward_model" in self.m.reward else "compare") if mode == "auto" else mode

    def use_reference(self, ref):
        self.ref = ref  # the mixture's second model: a frozen copy or the adapters-disabled base
        return ref

    def score(self, rows, texts, tag: str):
        total, parts = self.rewards(rows, texts)
        return total, {f"rewards/{name}/{tag}": r.mean().item() for name, r in parts.items()}

    @torch.no_grad()
    def collect(self, model) -> tuple[list[PolicySample], dict]:
        m, tok, G = self.m, self.tok, self.m.num_generations
        t0 = time.perf_counter()
        picked = self.draw(m.prompts_per_step)
        rows, ids = [self.rows[i] for i in picked], [self.prompt_ids[i] for i in picked]
        self.seed += 1
        seed = self.seed * self.world + self.rank
        y = generate(model, ids, self.sampling(), tok.stop_token_ids, tok.pad_token_id, num_samples=G, seed=seed,
                     tokenizer=tok)
        y_mix = generate(model, ids, self.sampling(), tok.stop_token_ids, tok.pad_token_id, num_samples=G,
                         seed=seed + 1_000_003, tokenizer=tok, mixture_model=self.ref, mixture_coef=m.mixture_coef)
        r_pol, metrics = self.score(rows, y.texts(tok), "mean")
        r_mix, mix_metrics = self.score(rows, y_mix.texts(tok), "mixture")
        metrics.update(mix_metrics)
        pref = preference_probability(r_pol, r_mix) if self.mode == "sigmoid" else compare_preference(r_pol, r_mix)
        out = []
        for i in range(len(rows)):
            for j in range(G):
                k = i * G + j
                n = int(y.mask[k].sum())
                out.append(PolicySample(seq=ids[i] + y.completion_ids[k, :n].tolist(), prompt_len=len(ids[i]),
                                        mask=y.mask[k].cpu(), preference=pref[k]))
        lengths = y.mask.sum(1)
        metrics.update({
            "reward": r_pol.mean().item(), "reward_mixture": r_mix.mean().item(),
            "win_rate": (r_pol > r_mix).float().mean().item(), "tie_rate": (r_pol == r_mix).float().mean().item(),
            "completion_length/mean": lengths.mean().item(), "completion_length/mixture": y_mix.mask.sum(1).mean().item(),
            "truncated_ratio": y.truncated.float().mean().item(), "rollout_s": time.perf_counter() - t0,
        })
        return out, metrics

    def next_step(self, model) -> Step:
        samples, metrics = self.collect(model)
        mb = self.m.micro_batch_size
        micro = [samples[i:i + mb] for i in range(0, len(samples), mb)]
        return Step(micro, micro_batch_weights(micro, self.normaliser, self.world), metrics)

    def loss_inputs(self, model, ref, micro: list[PolicySample]):
        tok, dev = self.tok, self.device
        width = micro[0].mask.shape[0]
        seqs, plens = [s.seq for s in micro], [s.prompt_len for s in micro]
        logps, ent = completion_logprobs(model, plens, seqs, width, tok.pad_token_id, self.m.temperature,
                                         with_entropy=True)
        mask = torch.stack([s.mask for s in micro]).to(dev)
        with torch.no_grad():
            ref_logps = completion_logprobs(ref, plens, seqs, width, tok.pad_token_id, self.m.temperature)
        inputs = {"policy_logps": logps, "ref_logps": ref_logps, "mask": mask,
                  "preference": torch.stack([s.preference for s in micro]).to(device=dev, dtype=logps.dtype)}
        return inputs, sum(len(s) for s in seqs), {"entropy": float(masked_mean(ent.detach(), mask))}
