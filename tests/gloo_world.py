"""Test helper: run a function in N forked CPU processes that form a torchrun-style world (gloo).

Each process gets the environment torchrun would give it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so code under test joins the world exactly as it does under
torchrun (:func:`fastmeal.distributed.init_distributed`). Processes are forked, not spawned: they
inherit the imported modules, which saves the tens of seconds a fresh interpreter spends importing
torch and timm on a loaded 2-core machine. Each process uses one intra-op thread (two processes on
two cores).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, results: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        outcome = ("error", traceback.format_exc())
    finally:
        from fastmeal.distributed import shutdown

        shutdown()
    # Pickled here, by value: a tensor sent through the queue as shared memory would need this
    # process alive until the parent has read it.
    results.put((rank, pickle.dumps(outcome)))


class World:
    """``world_size`` forked processes running ``fn(rank, world_size, *args)``; see :meth:`results`."""

    def __init__(self, fn: Callable[..., Any], world_size: int, *args: Any) -> None:
        ctx = mp.get_context("fork")
        self._results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, self._results, args))
                      for rank in range(world_size)]
        for p in self.procs:
            p.start()

    def results(self, timeout: float = 120.0) -> list[Any]:
        """Every rank's return value, in rank order; raises with the worker's traceback if one failed."""
        outcomes: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < len(self.procs):
                try:
                    rank, payload = self._results.get(timeout=0.2)
                    outcomes[rank] = pickle.loads(payload)
                    continue
                except queue.Empty:
                    pass
                dead = [r for r, p in enumerate(self.procs) if r not in outcomes and p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(f"rank(s) {dead} died without a result (exit codes "
                                         f"{[self.procs[r].exitcode for r in dead]})")
                if time.monotonic() > deadline:
                    raise AssertionError(f"the world did not finish in {timeout:.0f} s; results from ranks "
                                         f"{sorted(outcomes)} only")
        finally:
            for p in self.procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        failed = {r: o[1] for r, o in outcomes.items() if o[0] == "error"}
        if failed:
            raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())))
        return [outcomes[r][1] for r in range(len(self.procs))]


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on every rank of a new world; the return values in rank order."""
    return World(fn, world_size, *args).results(timeout)
