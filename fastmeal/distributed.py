"""Process-group set-up for torchrun (one process per GPU, NCCL; gloo on the CPU) and small helpers.

A run started without torchrun is a world of one and never initialises a process group, so every
helper here is also correct (and free) in a plain single-process run. torchrun describes the world in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), on one
node (``--nproc-per-node 8``) or several (``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from fastmeal.config import ConfigError

if TYPE_CHECKING:
    from fastmeal.config import DataConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when CUDA is available, else the CPU; ``cuda`` without CUDA fails."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
        raise ConfigError(f"runtime.device=cuda was asked for but CUDA is not available (torch {torch.__version__}, "
                          f"{why}); use runtime.device=cpu (or auto)")
    return torch.device("cuda", local_rank)


def configure_device(cudnn_benchmark: bool, device: torch.device) -> None:
    """The process-wide CUDA settings of a run (``runtime.cudnn_benchmark``); nothing on the CPU.

    Set before the teachers' CUDA graphs are captured (their warm-up is where cuDNN autotunes) and again
    by the trainer, so ``fastmeal train`` and the benchmarks run the convolutions the same way.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds the group to this rank's GPU: NCCL connects now, not lazily inside the first step.
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def per_rank_batch(global_batch: int, world_size: int, *, key: str = "data.batch_size") -> int:
    """The config states the global batch; each rank takes an equal share of it.

    The reference's 512 is 64 per GPU on 8 GPUs (SPEC); a share that is not whole would change the
    batch the optimiser sees, so it is an error, not a rounding.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``; the message names ``key``.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        hint = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise ConfigError(f"{key}={global_batch} (the global batch) is not divisible by the world size {world_size}; "
                          f"choose a multiple of {world_size}, e.g. {hint}")
    return global_batch // world_size


def check_global_batches(data: DataConfig, world_size: int) -> None:
    """Fail at start-up, on every rank and before any process waits for another, on a batch that does not split.

    Checks the training batch (``data.batch_size``) and the evaluation batch (``data.eval_batch_size``,
    which defaults to the training batch).
    """
    per_rank_batch(data.batch_size, world_size, key="data.batch_size")
    if data.eval_batch_size:
        per_rank_batch(data.eval_batch_size, world_size, key="data.eval_batch_size")


def world_size_from_env() -> int:
    """The world size torchrun announced (``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every rank, in place; free in a world of one.

    DDP broadcasts rank 0's buffers at the start of each training forward, so between steps every
    rank holds rank 0's statistics updated by its *own* last batch. Before evaluating or saving, this
    makes every rank hold rank 0's, which are the ones its checkpoint stores (the reference's
    DataParallel, too, keeps the statistics of the first GPU's sub-batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a world of one. Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_ranks_agree(value: Any, what: str, *, hint: str = "",
                      error: Callable[[str], Exception] = RuntimeError) -> None:
    """Raise on every rank when the ranks hold different values. Collective.

    Every rank raises, not only the odd one out: a lone failure would leave the others waiting in the
    next collective until the process-group timeout.

    Args:
        value: this rank's value (picklable, comparable with ``==``).
        what: what the value is, for the message (e.g. "the checkpoint to resume from").
        hint: how to fix it, appended to the message.
        error: the exception type to raise, given the message.
    """
    values = all_gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        per_rank = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise error(f"the ranks disagree on {what} ({per_rank}){'; ' + hint if hint else ''}")
