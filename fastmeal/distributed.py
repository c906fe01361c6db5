"""Process-group set-up for torchrun (one process per GPU, NCCL; gloo on the CPU) and small helpers.

A run started without torchrun is a world of one and never initialises a process group, so every
helper here is also correct (and free) in a plain single-process run. torchrun describes the world in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), on one
node (``--nproc-per-node 8``) or several (``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from fastmeal.config import ConfigError
from fastmeal.signals import signals_deferred

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


# What a loader worker ignores: the rank's preemption signals (torchrun and SLURM signal every process of
# the rank) and Ctrl-C's SIGINT, which the terminal sends to the whole foreground process group. The rank
# handles each of them and then ends its workers itself.
WORKER_IGNORED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def _worker_ignored_signums() -> list[int]:
    import signal

    return [getattr(signal, name) for name in WORKER_IGNORED_SIGNALS if hasattr(signal, name)]


@contextlib.contextmanager
def worker_signals_blocked() -> Iterator[None]:
    """Hold back :data:`WORKER_IGNORED_SIGNALS` while loader workers are started, in the workers and here.

    A child starts with its parent's signal mask, so a worker forked (or started from a forkserver that is
    itself started) inside this block holds those signals pending, not delivered, until
    :func:`ignore_preemption_signals` has made it ignore them. Without the block, a signal that arrives
    between the fork and ``worker_init_fn`` meets torch's worker handler (SIGTERM kills it) or Python's
    (SIGINT raises in it), and the rank fails instead of stopping cleanly.

    Masking this thread does not hold the rank's own handlers back: the kernel hands a process-directed
    signal to any thread that does not block it (torch's pin-memory or logging threads), and Python then
    runs the handler in the main thread at its next bytecode, in the middle of DataLoader's ``__init__``
    (a Ctrl-C there left an iterator without ``_workers`` and a traceback at exit). So the rank's handlers
    are deferred too (:func:`fastmeal.signals.signals_deferred`): what arrives is handled once the workers
    are up.
    """
    import signal

    signums = _worker_ignored_signums()
    with signals_deferred(signums):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # what was pending is noted, then raised again


def ignore_preemption_signals(worker_id: int = 0) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """DataLoader ``worker_init_fn``: the loader's worker processes ignore SIGTERM, SIGUSR1 and SIGINT.

    torchrun forwards a signal to each rank's whole process group and SLURM signals every process of a
    job step, so the loader's workers get the rank's preemption signal too. torch's worker dies on a
    SIGTERM that does not come from its parent, and the rank's SIGCHLD handler then raises in the
    middle of the step, before the checkpoint. The rank handles the signal (:class:`PreemptionHandler`);
    its workers end when it closes its loaders (``fastmeal.data.close_loaders``, on every exit path), and
    the kernel kills them when the rank dies (``PR_SET_PDEATHSIG``), so none is left behind. Workers
    started inside :func:`worker_signals_blocked` get the signals unblocked here, once they are ignored
    (a signal still pending then is discarded).
    """
    import signal

    signums = _worker_ignored_signums()
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies, however it dies (SIGKILL included).

    A worker that ignores SIGTERM would otherwise outlive a rank killed by a signal as an orphan.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the worker's own parent watchdog remains
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 (what SLURM sends before it kills a job) into a graceful stop.

    The handler only records the signal; the training loop asks :meth:`should_stop` after each step,
    so the current step finishes, then every rank agrees to stop, writes the checkpoint together and
    exits 0. In a distributed run the ranks agree through a small CPU (gloo) all-reduce so that the
    check never synchronises the GPU stream; a signal that reached only one rank stops them all.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._group = None
        self._pending: tuple[Any, torch.Tensor] | None = None  # the all-reduce started by the last check

    def install(self) -> PreemptionHandler:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. not under some test runners)
        if not self._previous:  # idempotent: `fastmeal train` installs it before set-up, the hook again
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._on_signal)
        # The agreement group needs the process group, which may start after the handlers are installed.
        if self._group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def finish(self) -> None:
        """Wait for the agreement all-reduce still in flight, if any: none may outlive the process group."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def uninstall(self) -> None:
        import signal

        self.finish()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        import signal

        self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank once any rank has received a preemption signal.

        In a distributed run each call starts an asynchronous all-reduce of this rank's flag and reads
        the one the previous call started, which has long finished: no call waits for the other ranks.
        Every rank makes the same calls in the same order, so they all read the same value at the same
        call, and a signal that reached any rank stops them all one call (one step) later.
        """
        local = self.signal_name is not None
        if self._group is None:
            return local
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())  # a CPU tensor: no device sync
        if stop:
            self._pending = None
            if self.signal_name is None:
                self.signal_name = "peer"
            return True
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False
