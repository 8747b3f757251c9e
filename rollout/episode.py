"""The typed rows between a rollout and a policy-gradient loss.

An `Episode` is one sampled (or given) completion of one prompt, with everything the loss needs
and nothing it has to guess: the token ids, which completion positions are trained, the sampling
policy's log-probs of them and the advantage. Tensors are padded to the generation batch's width so
a micro-batch stacks without copying; `seq` holds the unpadded prompt + completion ids the
training forward runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Episode:
    seq: list[int]              # prompt + completion token ids (completion up to and including its stop token)
    prompt_len: int             # tokens of seq that are the prompt
    mask: torch.Tensor          # (width,) 1.0 on completion positions the loss trains on, 0 on padding
    old_logps: torch.Tensor     # (width,) log-probs of the completion tokens under the sampling policy
    advantage: torch.Tensor     # () the completion's advantage, broadcast over its tokens by the loss
    reward: float = 0.0         # the total reward it was given

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "Episode":
        return cls(**d)


def stack(episodes: list[Episode], name: str, device) -> torch.Tensor:
    """One field of a micro-batch as a (rows, ...) tensor on `device`."""
    return torch.stack([getattr(e, name) for e in episodes]).to(device)
