"""Process-group set-up for torchrun (one process per GPU, NCCL; gloo on the CPU) and small helpers.

A run started without torchrun is a world of one and never initialises a process group, so every
helper here is also correct (and free) in a plain single-process run. torchrun describes the world in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), on one
node (``--nproc-per-node 8``) or several (``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from fastmeal import lifecycle
from fastmeal.config import ConfigError, RuntimeConfig

if TYPE_CHECKING:
    from fastmeal.config import DataConfig

log = logging.getLogger("fastmeal.distributed")


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


class LostPeerError(RuntimeError):
    """Another rank of the run is gone (killed, crashed, stopped, or unreachable): this rank cannot go on.

    Not a bug of this rank, and nothing to fix in the input: every surviving rank stops without writing
    anything more, and a restart (torchrun ``--max-restarts``, or the same command again) continues from
    the last checkpoint with ``--resume auto``.
    """

    def __init__(self, who: str, detail: str, resume: str = "running the same command again continues from what "
                 "was saved") -> None:
        self.who, self.detail, self.resume = who, detail, resume
        super().__init__(f"{who} ({detail}); this rank stops; {resume}")

    def resuming(self, resume: str) -> LostPeerError:
        """The same error whose advice says where a restart continues (e.g. "... from step 120")."""
        return LostPeerError(self.who, self.detail, resume)


@dataclass(frozen=True)
class _World:
    """What this process learnt at set-up about its world, kept to name a lost peer after the group is gone."""

    rank: int
    world_size: int
    peers: tuple[tuple[str, int], ...] = ()  # (host, pid) of every rank, in rank order; empty when unknown


_world: _World | None = None

# Messages of the errors torch raises when a peer is gone (lower case): a connection the peer's death closed
# (gloo's sockets, the store's when the rank hosting it is gone), NCCL's remote errors and aborted
# communicators; and timeouts, but only from torch.distributed itself (a DistError, or gloo's, NCCL's or the
# store's message): a timeout elsewhere is no news about a peer.
# gloo's "Application timeout caused pair closure": a pair whose peer stopped answering (raised from DDP's
# buffer broadcast, where the message names neither gloo nor a store).
_LOST_PEER_MARKS = ("connection reset by peer", "connection closed by peer", "connection refused", "broken pipe",
                    "connectfullmesh", "communicator was aborted", "ncclremoteerror", "ncclsystemerror",
                    "remote process exited", "caused pair closure")
_TIMEOUT_MARKS = ("timed out", "timeout", "has been aborted")
_DIST_SOURCES = ("gloo", "nccl", "processgroup", "tcpstore", "store")


def lost_peer_error(err: BaseException) -> LostPeerError | None:
    """``err`` as a :class:`LostPeerError` when it (or an exception in its cause/context chain) says a peer rank
    is gone; None otherwise, and always None outside a distributed run.

    A collective that fails because another rank died or stopped raises a ``RuntimeError`` (torch's
    ``DistError`` family included) whose message names a connection reset or refusal, a timeout, or an
    aborted NCCL communicator; a clean-up that waits on the same dead peer raises again with the first
    failure as its context, so the whole chain is searched.
    """
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, LostPeerError):
            return node
        if _world is not None and _world.world_size > 1 and isinstance(node, RuntimeError) and not isinstance(
                node, OSError) and _says_peer_lost(node):
            return LostPeerError(_who_is_gone(), _first_line(str(node)))
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


def _says_peer_lost(err: RuntimeError) -> bool:
    text = str(err).lower()
    if any(mark in text for mark in _LOST_PEER_MARKS):
        return True
    from_dist = isinstance(err, dist.DistError) or any(source in text for source in _DIST_SOURCES)
    return from_dist and any(mark in text for mark in _TIMEOUT_MARKS)


def _first_line(text: str, limit: int = 160) -> str:
    """The message's first sentence without the C++ source location gloo/NCCL put in front of it, shortened."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "no message")
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line).split(". ")[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _who_is_gone() -> str:
    """Which peer is gone, from the (host, pid) every rank published at set-up: a peer on this host is checked in
    /proc (gone, or stopped by SIGSTOP); a peer on another host cannot be, and the message says so."""
    world = _world
    assert world is not None
    here, states = socket.gethostname(), []
    for rank, (host, pid) in enumerate(world.peers):
        if rank != world.rank and host == here:
            state = _process_state(pid)
            if state != "running":
                states.append(f"rank {rank} of {world.world_size} is {state}")
    if states:
        return "; ".join(states)
    if not world.peers:  # the set-up itself failed: no table yet
        return f"a peer of rank {world.rank} of {world.world_size} did not answer"
    if all(host == here for host, _ in world.peers):
        return f"a peer of rank {world.rank} of {world.world_size} stopped answering"
    return f"a peer of rank {world.rank} of {world.world_size} is gone or stopped answering (on another node)"


def _process_state(pid: int) -> str:
    """``gone``, ``stopped (SIGSTOP)`` or ``running``, from /proc/PID/stat (Linux; ``running`` when unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "running"
    state = stat.rsplit(")", 1)[-1].split()[0]  # the field after "(comm)", which may itself hold spaces
    return {"Z": "gone", "X": "gone", "T": "stopped (SIGSTOP)", "t": "stopped (traced)"}.get(state, "running")


def _round_store(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """A namespace of ``store`` that belongs to this restart round alone.

    torchrun's agent keeps one store for the whole job and hands it to the ranks of every restart round
    (``TORCHELASTIC_USE_AGENT_STORE``), so the keys the previous round's process group wrote are still
    there: a restarted rank read a dead peer's gloo address and failed with ``Connection refused``, or
    NCCL's id of the old round, or hung. Rank 0 draws a random prefix; every other rank posts a random
    ticket and waits for rank 0's answer under a key named after that ticket, which no earlier round can
    have written; rank 0 answers every ticket it sees (stale ones too, harmlessly) until each rank has
    acknowledged the prefix under a key named after the prefix.
    """
    import secrets
    import time

    deadline = time.monotonic() + timeout.total_seconds()
    if rank != 0:
        ticket = secrets.token_hex(8)
        store.set(f"fastmeal/ticket/{rank}", ticket)
        prefix = store.get(f"fastmeal/answer/{rank}/{ticket}").decode()  # waits up to the store's timeout
        store.set(f"fastmeal/ack/{prefix}/{rank}", "1")
        return dist.PrefixStore(f"fastmeal/{prefix}/", store)
    prefix = secrets.token_hex(8)
    waiting, answered = set(range(1, world_size)), {}
    while waiting:
        for peer in sorted(waiting):
            key = f"fastmeal/ticket/{peer}"
            if store.check([key]):
                ticket = store.get(key).decode()
                if answered.get(peer) != ticket:
                    store.set(f"fastmeal/answer/{peer}/{ticket}", prefix)
                    answered[peer] = ticket
            if store.check([f"fastmeal/ack/{prefix}/{peer}"]):
                waiting.discard(peer)
        if waiting and time.monotonic() > deadline:
            missing = ", ".join(str(r) for r in sorted(waiting))
            raise LostPeerError(f"rank(s) {missing} of {world_size} did not join within "
                                f"{timeout.total_seconds():.0f} s", "process-group set-up",
                                "start every rank (torchrun starts them all), or raise runtime.dist_timeout_s")
        time.sleep(0.05)
    return dist.PrefixStore(f"fastmeal/{prefix}/", store)


def init_distributed(device_preference: str = "auto", timeout_s: float = RuntimeConfig.dist_timeout_s) -> DistInfo:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    * a stop signal (SIGTERM, SIGUSR1, SIGINT) while the set-up blocks ends the process at once (its
      handler could only run between bytecodes, and the set-up blocks in C++ for up to the timeout);
    * under torchrun's shared store, the group's keys live in a namespace of this restart round alone
      (:func:`_round_store`), so a restarted round never reads the previous round's addresses;
    * every collective (and the set-up's wait for the other ranks) fails after ``timeout_s`` instead of
      hanging, and NCCL aborts its communicators on a failure or timeout and raises in this process
      (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``) rather than tearing it down from its watchdog thread, so the
      caller sees an error that :func:`lost_peer_error` recognises;
    * every rank publishes its host and pid, so that a survivor can say which peer is gone.

    Args:
        device_preference: ``runtime.device`` (auto | cpu | cuda).
        timeout_s: ``runtime.dist_timeout_s``, seconds.
    """
    global _world
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # Read when the NCCL group is created: abort and raise here, not kill the process from the watchdog.
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
        log.info("rank %d of %d: joining the process group at %s:%d (timeout %.0f s)", rank, world_size, addr, port,
                 timeout_s)
        _world = _World(rank, world_size)  # a set-up that times out is a lost peer too
        with lifecycle.default_stop_action():  # a stop signal ends the process while the set-up blocks
            # torchrun's agent hosts the store for every round; without torchrun (or with its store sharing
            # off) rank 0 hosts a fresh one each time it starts, and no key outlives a round.
            shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store: dist.Store = dist.TCPStore(addr, port, world_size, is_master=rank == 0 and not shared,
                                              timeout=timeout)
            if shared:
                store = _round_store(store, rank, world_size, timeout)
            store.set(f"peer/{rank}", f"{socket.gethostname()} {os.getpid()}")
            if device.type == "cuda":
                # device_id binds the group to this rank's GPU: NCCL connects now, not lazily inside the first step.
                dist.init_process_group(backend="nccl", store=store, rank=rank, world_size=world_size,
                                        timeout=timeout, device_id=device)
            else:
                dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world_size,
                                        timeout=timeout)
            # Every rank set its key before joining, and joining waited for all of them.
            peers = [store.get(f"peer/{r}").decode().rsplit(" ", 1) for r in range(world_size)]
        _world = _World(rank, world_size, tuple((host, int(pid)) for host, pid in peers))
    elif world_size > 1 and _world is None:  # a group someone else started: no peer table
        _world = _World(rank, world_size)
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
