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
    # Every collective helper is a no-op in a world of one.
    bn = nn.BatchNorm1d(3)
    broadcast_buffers(bn)
    assert all_gather_objects("x") == ["x"]
    check_ranks_agree("anything", "a value")


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
