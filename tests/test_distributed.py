"""Process-group helpers: per-rank batch, device choice, buffer broadcast, rank agreement, stop agreement."""

import os
import signal

import pytest
import torch
import torch.distributed as dist
from gloo_world import run_world
from torch import nn

from fastmeal import lifecycle
from fastmeal.config import ConfigError, DataConfig
from fastmeal.distributed import (
    DistInfo,
    all_gather_objects,
    broadcast_buffers,
    check_global_batches,
    check_ranks_agree,
    init_distributed,
    per_rank_batch,
    resolve_device,
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


def _collectives_worker(rank: int, world_size: int):
    init_distributed("cpu")
    with lifecycle.handling_stops():
        agreement = lifecycle.StopAgreement()
        first = agreement.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled ...
        # ... the check right after it starts the ranks' exchange without waiting for it, and the next one
        # reads it: both ranks agree to stop at the same check, one step after the signal.
        second = agreement.should_stop()
        third = agreement.should_stop()
        agreement.finish()
        preemption = (first, second, third, agreement.reason)

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


def _restart_round(rank: int, world_size: int, port: int, rank0_delay: float) -> float:
    """A rank of one torchrun restart round: the store is the agent's (``port``), shared by every round."""
    import time

    os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    if rank == 0:
        time.sleep(rank0_delay)  # the other ranks reach the set-up first and would read what the last round left
    init_distributed("cpu", timeout_s=30)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return total.item()


@pytest.mark.slow
def test_a_restart_round_never_reads_the_keys_of_the_round_before():
    """torchrun's agent keeps one store for all rounds: round 2 must not connect to round 1's dead addresses.

    Without a namespace per round (measured by replacing ``_round_store`` with the plain store), rank 1 of
    round 2 reads rank 0's gloo address of round 1 and fails with "Connection refused" after gloo's retries,
    and rank 0 hangs in the set-up past its timeout. Rank 0's delay, longer than those retries, makes that
    order certain instead of likely (a restarted rank 0 that imports more slowly than the others).
    """
    from gloo_world import free_port
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the agent's, outliving the ranks
    assert run_world(_restart_round, 2, port, 0.0, timeout=60) == [3.0, 3.0]
    assert run_world(_restart_round, 2, port, 8.0, timeout=60) == [3.0, 3.0]
    assert store.num_keys() > 0  # the rounds did use this store


def test_lost_peer_errors_are_recognised_in_the_chain_and_name_the_gone_rank(monkeypatch):
    import socket
    import subprocess
    import time

    import fastmeal.distributed as fd

    here = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stopped = subprocess.Popen(["sleep", "60"])
    try:
        stopped.send_signal(signal.SIGSTOP)
        for _ in range(200):  # the kernel stops it asynchronously
            with open(f"/proc/{stopped.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.01)
        monkeypatch.setattr(fd, "_world", fd._World(0, 3, ((here, os.getpid()), (here, dead.pid), (here, stopped.pid))))
        reset = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:31951: "
                             "Connection reset by peer. This is typically caused by a remote worker hanging")
        try:
            try:
                raise reset
            finally:
                raise RuntimeError("waiting for the agreement all-reduce failed")  # a clean-up on the same peer
        except RuntimeError as err:
            lost = fd.lost_peer_error(err)
        assert isinstance(lost, fd.LostPeerError)
        assert str(lost) == ("rank 1 of 3 is gone; rank 2 of 3 is stopped (SIGSTOP) (Read error [127.0.0.1]:31951: "
                             "Connection reset by peer); this rank stops; running the same command again continues "
                             "from what was saved")
        assert str(lost.resuming("a restart with --resume auto continues from step 7")).endswith(
            "this rank stops; a restart with --resume auto continues from step 7")
        nccl = RuntimeError("[PG 0 Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
                            "OpType=ALLREDUCE) ran for 300000 milliseconds before timing out.")
        assert fd.lost_peer_error(nccl) is not None
        assert fd.lost_peer_error(dist.DistNetworkError("Connection reset by peer")) is not None
        gloo_timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                                    "waiting 3000ms for recv operation to complete")
        assert "Timed out waiting 3000ms for recv operation to complete)" in str(fd.lost_peer_error(gloo_timeout))
        assert fd.lost_peer_error(dist.DistStoreError("Socket Timeout")) is not None
        # gloo's pair timeout as DDP's buffer broadcast raises it (seen in CI with a SIGSTOPped peer)
        assert fd.lost_peer_error(RuntimeError("Application timeout caused pair closure")) is not None
        assert fd.lost_peer_error(RuntimeError("reading the image timed out")) is None  # a timeout, not torch's
        # Not a lost peer: another error, an OSError of this rank (a network file system), a world of one.
        assert fd.lost_peer_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
        assert fd.lost_peer_error(ConnectionResetError(104, "Connection reset by peer")) is None
        monkeypatch.setattr(fd, "_world", fd._World(0, 1))
        assert fd.lost_peer_error(reset) is None
    finally:
        stopped.kill()
        stopped.wait()
