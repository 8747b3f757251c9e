"""Data parallelism with FSDP2 under torchrun; one process without torchrun runs the same code.

    torchrun --nproc_per_node=8 train.py method=sft ...                 one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...   (and node_rank=1)

`init()` starts the process group when torchrun set WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU, so
the tests run two CPU processes). `shard()` applies `torch.distributed.fsdp.fully_shard` to each
transformer block (one FSDP unit per block: its parameters are gathered just before it runs and
freed after) and then to the root, which holds the embeddings, the final norm and the head. On CUDA
the blocks compute in bf16 and gradients are reduced in fp32 (`MixedPrecisionPolicy`). The frozen
reference copy of full fine-tuning is sharded the same way (train.py).

How the work splits: each rank runs `batch_size` examples per micro-batch, so the global batch is
batch_size × grad_accum × world_size. Every rank draws the same global step from the same seed and
keeps its own share (`rank::world`), so N processes see exactly the batches one process with
grad_accum × N would, and FSDP's gradient average equals the single-process average. RL methods
split the step's prompts the same way: each rank samples its own groups. Rank 0 alone writes
metrics, evaluation and the final model; checkpoints are sharded (torch.distributed.checkpoint),
each rank writing its own shard.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def log(*args, **kwargs) -> None:
    """print() on rank 0 only: under torchrun every rank runs the same code, and N copies of every
    line are noise. Errors and warnings that concern one rank go to stderr with print() directly."""
    if is_main():
        print(*args, **kwargs, flush=True)


def init(device_pref: str = "auto") -> torch.device | None:
    """Start the process group when launched by torchrun with more than one process.

    Returns the device this rank must use (cuda:LOCAL_RANK on GPUs, cpu otherwise), or None when
    the run is a single process (the caller picks its device as usual).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def shard(model, mixed_precision: bool) -> None:
    """FSDP2: one unit per transformer block, then the root (embeddings, norm, head; tied or not)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    # the root keeps its parameters gathered after forward: the loss reads lm_head's weight directly
    # (chunked log-probs, losses/common.py), outside any submodule's forward
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(x: float) -> float:
    """The average of a Python number over ranks (itself on one process)."""
    return total(x) / world_size()


def total(x: float) -> float:
    """The sum of a Python number over ranks (itself on one process)."""
    if world_size() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.item()


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank. Loops that call the sharded model must stop together,
    or one rank waits forever in a collective the others never join."""
    if world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t)
    return t.item() == 0


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's 1-D tensor concatenated in rank order, and where this rank's part starts (for
    statistics over the whole batch, e.g. batch-normalised advantages; sizes may differ by rank)."""
    if world_size() == 1:
        return x, 0
    parts = [None] * world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts).to(x.device), sum(len(p) for p in parts[:rank()])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def full_state_dict(model) -> dict:
    """The whole model's state on rank 0 (CPU tensors; empty on other ranks). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
