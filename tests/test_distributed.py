"""Process-group helpers: per-rank batch, device choice, buffer broadcast, rank agreement, preemption agreement."""

import contextlib
import multiprocessing
import os
import signal

import pytest
import torch
import torch.distributed as dist
from gloo_world import run_world
from torch import nn

from fastmeal.config import ConfigError, DataConfig
from fastmeal.distributed import (
    DistInfo,
    PreemptionHandler,
    all_gather_objects,
    broadcast_buffers,
    check_global_batches,
    check_ranks_agree,
    ignore_preemption_signals,
    init_distributed,
    per_rank_batch,
    resolve_device,
    worker_signals_blocked,
)


def test_per_rank_batch():
    assert per_rank_batch(512, 8) == 64
    assert per_rank_batch(7, 1) == 7
    # A ConfigError (a ValueError): the CLI reports it as a config error, without a traceback.
    with pytest.raises(ConfigError, match=r"data.batch_size=512 \(the global batch\) is not divisible by the world "
                                          r"size 3; choose a multiple of 3, e.g. 510 or 513"):
        per_rank_batch(512, 3)
    with pytest.raises(ConfigError, match=r"data.eval_batch_size=2 .* world size 4; .* e.g. 4$"):
        per_rank_batch(2, 4, key="data.eval_batch_size")


def test_check_global_batches_names_the_field_that_does_not_split():
    check_global_batches(DataConfig(batch_size=512, eval_batch_size=0), 8)
    with pytest.raises(ConfigError, match="data.batch_size=6"):
        check_global_batches(DataConfig(batch_size=6), 4)
    with pytest.raises(ConfigError, match="data.eval_batch_size=250"):
        check_global_batches(DataConfig(batch_size=512, eval_batch_size=250), 8)


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.distributed and not dist.is_initialized()
    # Every collective helper is a no-op in a world of one: no collective call, the buffers untouched.
    def collective(*args, **kwargs):
        raise AssertionError("a collective was called in a world of one")

    for name in ("broadcast", "all_gather_object", "all_reduce", "barrier"):
        monkeypatch.setattr(dist, name, collective)
    bn = nn.BatchNorm1d(3)
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 3.0]))
    bn.running_var.fill_(5.0)
    bn.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    broadcast_buffers(bn)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    assert all_gather_objects("x") == ["x"]
    assert check_ranks_agree("anything", "a value") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_request_without_cuda_fails_clearly():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="runtime.device=cpu"):
        resolve_device("cuda")


def test_preemption_signal_is_recorded_not_raised():
    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.signal_name == "SIGUSR1"
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def _collectives_worker(rank: int, world_size: int):
    init_distributed("cpu")
    handler = PreemptionHandler().install()
    try:
        first = handler.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled ...
        # ... the check right after it starts the ranks' exchange without waiting for it, and the next one
        # reads it: both ranks agree to stop at the same check, one step after the signal.
        second = handler.should_stop()
        third = handler.should_stop()
        preemption = (first, second, third, handler.signal_name)
    finally:
        handler.uninstall()

    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(rank + 1))  # each rank's own statistics, as after a DDP step
    broadcast_buffers(bn)
    gathered = all_gather_objects(rank * 10)
    agreed = check_ranks_agree("same", "a value") is None
    try:
        check_ranks_agree(f"rank-{rank}", "the checkpoint to resume from", hint="use a shared file system",
                          error=ValueError)
        disagreement = None
    except ValueError as err:
        disagreement = str(err)
    return preemption, bn.running_mean.tolist(), gathered, agreed, disagreement


def test_collectives_across_two_gloo_ranks():
    results = run_world(_collectives_worker, 2)
    assert results[0][0] == (False, False, True, "peer")
    assert results[1][0] == (False, False, True, "SIGTERM")
    for _, running_mean, gathered, agreed, disagreement in results:
        assert running_mean == [1.0, 1.0]  # rank 0's statistics everywhere
        assert gathered == [0, 10]
        assert agreed
        # Every rank raises (not only the odd one out), naming every rank's value and the fix.
        assert disagreement == ("the ranks disagree on the checkpoint to resume from (rank 0: 'rank-0'; "
                                "rank 1: 'rank-1'); use a shared file system")


class _SignalDispositions(torch.utils.data.Dataset):
    """Each item: this worker's pid and whether it ignores SIGTERM and SIGUSR1."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return os.getpid(), [signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1)]


def test_loader_workers_ignore_preemption_signals_meant_for_their_rank():
    """torchrun signals the rank's process group; the worker must survive it for the rank to checkpoint."""
    from torch.utils.data import DataLoader

    def batches(worker_init_fn):
        loader = DataLoader(_SignalDispositions(), batch_size=None, num_workers=1, persistent_workers=True,
                            worker_init_fn=worker_init_fn)
        return loader, iter(loader)

    _, plain = batches(None)
    assert next(plain)[1] == [False, False]  # torch's own worker: SIGTERM from anyone but its parent kills it
    del plain
    loader, it = batches(ignore_preemption_signals)
    pid, ignored = next(it)
    assert ignored == [True, True]
    os.kill(pid, signal.SIGTERM)  # as torchrun's os.killpg reaches it
    assert [next(it)[0] for _ in range(3)] == [pid] * 3  # the same worker, alive, serves the rest of the epoch
    assert next(iter(loader))[0] == pid  # and the next epoch


def _late_ignoring_worker(go) -> None:
    """A worker that makes itself ignore the signals only after its parent has signalled it."""
    go.poll(30)  # a pipe, not an Event: a worker killed inside Event.wait leaves Event.set waiting for it forever
    ignore_preemption_signals()


@pytest.mark.parametrize("blocked", [True, False])
def test_a_signal_that_reaches_a_starting_worker_waits_until_it_ignores_it(blocked):
    """SIGTERM/SIGINT sent to the group between a worker's fork and its worker_init_fn must not kill it.

    The control (no block) shows the window is real: the same worker dies of the signal.
    """
    context = multiprocessing.get_context("fork")
    go, say_go = context.Pipe(duplex=False)
    worker = context.Process(target=_late_ignoring_worker, args=(go,))
    with worker_signals_blocked() if blocked else contextlib.nullcontext():
        worker.start()
    os.kill(worker.pid, signal.SIGTERM)  # before it ignores anything
    os.kill(worker.pid, signal.SIGINT)
    say_go.send(True)
    worker.join(30)
    assert worker.exitcode == (0 if blocked else -signal.SIGTERM)
    # The parent's own mask is back as it was: the rank still receives its signals.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_ctrl_c_while_workers_start_reaches_the_rank_after_the_block_not_inside_it():
    """Another thread (pin memory, logging) takes the process's SIGINT while this thread masks it.

    Python would then raise KeyboardInterrupt in this thread mid-block, in DataLoader's ``__init__``;
    the block holds it back and raises it once the block is done.
    """
    import threading
    import time

    other = threading.Event()
    helper = threading.Thread(target=other.wait, args=(30,), daemon=True)  # started unmasked
    helper.start()
    reached_the_end = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with worker_signals_blocked():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the kernel has handed it to the helper; Python has checked for it
                reached_the_end = True
    finally:
        other.set()
        helper.join()
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_process_that_leaves_loader_workers_running_still_exits():
    """Workers ignore SIGTERM, so multiprocessing's exit-time terminate() + join() alone would wait forever.

    The script leaves a DataLoader that fastmeal does not track (one made by the user), mid-epoch.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import fastmeal.data
        from torch.utils.data import DataLoader
        from fastmeal.distributed import ignore_preemption_signals
        loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,
                            worker_init_fn=ignore_preemption_signals)
        it = iter(loader)
        next(it)
        print(*(w.pid for w in it._workers))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]
    for pid in map(int, done.stdout.split()):
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its process"
