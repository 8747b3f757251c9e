"""Advantage estimators: rewards of G completions per prompt -> one advantage per completion.

A policy loss (grpo_loss, gspo_loss, cispo_loss) only needs an advantage per completion; how that
advantage is formed is a separate, orthogonal choice. So the estimators live here in a small registry
(verl's `register_adv_est` style): a config names one, `get_advantage(name)` returns it, and every
estimator is called the same way:
    advantages = get_advantage(name)(rewards, group_size, **options)     (N,) -> (N,)
`rewards` holds consecutive groups of `group_size` completions of one prompt. Integer rewards are
promoted to float. Batch statistics ("batch" scaling, REINFORCE++) are over the tensor passed in:
under data parallelism gather the rewards of every rank first (TRL gathers them), or each rank
normalises with its own shard's statistics.

    grpo    (r_i − mean_group(r)) / (std + eps)     GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300)
            scale_rewards = "group"  std over the completion's group        (TRL's default)
                            "batch"  std over every reward in the batch     (mean is still the group's)
                            "none"   no division: r_i − mean_group(r)        (Dr. GRPO's recommendation)
            eps = 1e-4 (TRL's constant).
    rloo    r_i − (1/(G−1)) Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean_group(r))
            RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740), TRL's RLOOTrainer. Optional
            normalize=True then standardises over the batch, (A − mean)/(std + 1e-4) (TRL's
            `normalize_advantages`, default False). A group of one has no leave-one-out baseline: A = 0.
    reinforce_plus_plus
            (r_i − mean_batch(r)) / (std_batch(r) + eps)    REINFORCE++ (Hu et al. 2025,
            https://arxiv.org/abs/2501.03262): global batch normalisation instead of per-prompt
            statistics; works with one completion per prompt (G = 1).
    reinforce_plus_plus_baseline
            Ã_i = r_i − mean_group(r), then (Ã_i − mean_batch(Ã)) / (std_batch(Ã) + eps): the paper's
            "REINFORCE++ w/ baseline" for G > 1. Unlike GRPO's "batch" scaling, the std is that of the
            group-centred rewards Ã, not of the raw rewards.

Every std is the UNBIASED sample std (Bessel, divides by n − 1), as torch.std and TRL; a single value
has no spread and its std is taken as 0 (torch would give NaN). Tied groups get A = 0 under grpo and
rloo. RLOO advantages sum to zero in every group; REINFORCE++ advantages have zero mean and (up to
eps) unit std over the batch.

KL in the reward (`kl_in_reward`), TRL's RLOO and the REINFORCE++ paper's form:
    r_i ← r_i − β · Σ_t (log π_old,t − log π_ref,t)       over the completion tokens of i
    the first-order (k1) log-ratio of the sampling policy against the reference, summed per sequence;
    it can be negative per token. Apply it to the rewards before any estimator. TRL's RLOO default is
    β = 0.05.

Departures:
    - REINFORCE++ (the paper and verl) adds the KL per token and normalises per token, so its
      advantage is a return-to-go A_t = r − β Σ_{s≥t} KL_s and the batch statistics weight each
      completion by its length. Here the advantage is one number per completion (every loss in this
      project takes that) and each completion counts once in the batch statistics (as ms-swift's
      reinforce_plus_plus and TRL's scale_rewards="batch"); kl_in_reward uses the whole-sequence sum
      (the paper's A_t at t = 1). With equal lengths and β = 0 the two agree.
    - eps: REINFORCE++ divides by std + 1e-4 here (TRL's constant, like grpo); verl uses
      rsqrt(var + 1e-8). Pass eps to change it.
    - RLOO: none from TRL's arithmetic. TRL also drops completions whose every reward function
      returned None from the baseline (NaN rewards); here rewards must all be finite.
"""
from __future__ import annotations

import torch

from losses.common import masked_sum

SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGES: dict = {}


def register_advantage(name: str):
    """Decorator: make an estimator available to configs as `name`."""
    def add(fn):
        if name in ADVANTAGES and ADVANTAGES[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered ({ADVANTAGES[name].__name__})")
        ADVANTAGES[name] = fn
        return fn
    return add


def get_advantage(name: str):
    """The estimator registered as `name`; a ValueError that lists the known names otherwise."""
    if name not in ADVANTAGES:
        raise ValueError(f"advantage estimator must be one of {tuple(sorted(ADVANTAGES))}, got {name!r}")
    return ADVANTAGES[name]


def _float(rewards) -> torch.Tensor:
    rewards = torch.as_tensor(rewards)
    return rewards if rewards.is_floating_point() else rewards.float()


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def _std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of all of x; 0 for a single value (no spread) instead of NaN."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


@register_advantage("grpo")
def group_advantages(rewards, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, consecutive groups of `group_size` completions of one prompt -> (N,) advantages."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    rewards = _float(rewards)
    groups = _grouped(rewards, group_size)
    adv = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return adv
    if scale_rewards == "group":
        std = groups.std(dim=1) if group_size > 1 else groups.new_zeros(groups.shape[0])
        std = std.repeat_interleave(group_size)
    else:
        std = _std(rewards)
    return adv / (std + eps)


@register_advantage("rloo")
def rloo_advantages(rewards, group_size: int, normalize: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Leave-one-out: each completion against the mean of the OTHER G − 1 of its group; (N,) -> (N,)."""
    rewards = _float(rewards)
    groups = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    adv = (groups - others).reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / (_std(adv) + eps)
    return adv


@register_advantage("reinforce_plus_plus")
def reinforce_pp_advantages(rewards, group_size: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """Global batch normalisation of the raw rewards; groups play no part (G = 1 is the usual case)."""
    rewards = _float(rewards)
    _grouped(rewards, group_size)  # same shape contract as every estimator
    return (rewards - rewards.mean()) / (_std(rewards) + eps)


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_pp_baseline_advantages(rewards, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Subtract the group mean, then normalise the centred rewards over the whole batch."""
    rewards = _float(rewards)
    groups = _grouped(rewards, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    return (centred - centred.mean()) / (_std(centred) + eps)


def kl_in_reward(rewards, old_logps, ref_logps, mask, beta: float) -> torch.Tensor:
    """rewards (N,) − β · Σ_t (old_logps − ref_logps) over the completion tokens; (N, T) log-probs and mask."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    rewards = _float(rewards)
    if old_logps.shape != ref_logps.shape or old_logps.shape != mask.shape or old_logps.dim() != 2:
        raise ValueError(f"old_logps, ref_logps and mask must share one (N, T) shape, got {tuple(old_logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(mask.shape)}")
    if rewards.shape != old_logps.shape[:1]:
        raise ValueError(f"rewards must be (N,) = ({old_logps.shape[0]},), got {tuple(rewards.shape)}")
    keep = mask.bool()
    log_ratio = torch.where(keep, old_logps - ref_logps, 0.0).detach()
    return rewards - beta * masked_sum(log_ratio, keep.to(log_ratio.dtype), -1).to(rewards.dtype)
