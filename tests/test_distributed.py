"""Process-group helpers: per-rank batch, device choice, and preemption agreement across ranks."""

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmeal.distributed import DistInfo, PreemptionHandler, init_distributed, per_rank_batch, resolve_device


def test_per_rank_batch():
    assert per_rank_batch(512, 8) == 64
    with pytest.raises(ValueError, match=r"data.batch_size=512.*not divisible by the world size 3"):
        per_rank_batch(512, 3)


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.distributed and not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_request_without_cuda_fails_clearly():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="runtime.device=cpu"):
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


def _agree_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    init_distributed("cpu")
    handler = PreemptionHandler().install()
    try:
        first = handler.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled ...
        second = handler.should_stop()  # ... and both ranks agree to stop
        results[rank] = (first, second, handler.signal_name)
    finally:
        handler.uninstall()
        dist.destroy_process_group()


def test_preemption_agreement_across_two_gloo_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == (False, True, "peer")
    assert results[1] == (False, True, "SIGTERM")
