"""The one stop path (fastmeal.lifecycle): signals recorded as stop requests, never raised; loader workers that
ignore the rank's signals and die with it; a second Ctrl-C that exits at once."""

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny import make_trainer, tiny_config

from fastmeal import lifecycle
from fastmeal.checkpoint import CheckpointManager, load_checkpoint
from fastmeal.hooks import TrainerHook
from fastmeal.lifecycle import worker_init, workers_starting


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_stop_signal_is_recorded_not_raised_and_the_handlers_are_put_back(name):
    before = {s: signal.getsignal(getattr(signal, s)) for s in lifecycle.STOP_SIGNALS}
    with lifecycle.handling_stops():
        with lifecycle.handling_stops():  # nested (the CLI's, then the trainer's): one set of handlers
            assert lifecycle.stop_requested() is None
            os.kill(os.getpid(), getattr(signal, name))
            time.sleep(0.05)
            assert lifecycle.stop_requested() == name
        assert lifecycle.stop_requested() == name  # the inner block keeps the outer one's request
        with pytest.raises(lifecycle.Stopped) as stopped:
            lifecycle.raise_if_stopped()
    assert lifecycle.stop_requested() is None  # the outermost block forgets it
    assert {s: signal.getsignal(getattr(signal, s)) for s in lifecycle.STOP_SIGNALS} == before
    assert stopped.value.exit_code == (130 if name == "SIGINT" else 128 + getattr(signal, name))


def test_stops_are_named_as_runs_and_users_see_them():
    assert lifecycle.describe("SIGINT") == "interrupted (Ctrl-C)"
    assert lifecycle.describe("SIGTERM") == "preempted by SIGTERM"
    assert lifecycle.describe("peer") == "preempted by peer"
    assert lifecycle.describe("a hook's reason") == "a hook's reason"
    assert "interrupted (Ctrl-C)" in str(lifecycle.Stopped("SIGINT"))
    assert "stopped by SIGTERM" in str(lifecycle.Stopped("SIGTERM"))


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background (nohup, &)
    try:
        with lifecycle.handling_stops():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert lifecycle.stop_requested() is None
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_exits_at_once_with_130_and_one_line():
    script = textwrap.dedent("""
        import os, signal, sys, time
        from fastmeal import lifecycle
        with lifecycle.handling_stops():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            print(lifecycle.stop_requested(), flush=True)  # the first one is only recorded
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("still running", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stdout.split() == ["SIGINT"]
    assert [line for line in done.stderr.splitlines() if line.startswith("fastmeal: ")] == [
        line for line in done.stderr.splitlines() if line.strip()] and "interrupted again" in done.stderr


def test_a_ctrl_c_during_a_save_lets_it_finish(tmp_path):
    """Cut inside torch.save, the save would be lost (torch's zip writer turns the exception into a RuntimeError);
    the handler only records the request, so the save finishes and the caller stops at its next step boundary."""
    from test_checkpoint import fake_state

    def save_with_ctrl_c(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler at the next bytecode, inside torch.save
        torch.save(obj, f)

    manager = CheckpointManager(tmp_path, keep_last=5)
    with lifecycle.handling_stops():
        manager.save(fake_state(7), global_step=7, top1=50.0, save=save_with_ctrl_c)
        assert lifecycle.stop_requested() == "SIGINT"
    assert load_checkpoint(tmp_path / "ckpt-000000007.pt")["global_step"] == 7
    assert json.loads((tmp_path / "manifest.json").read_text())["latest"] == "ckpt-000000007.pt"


class _CtrlCAt(TrainerHook):
    """Sends this process a SIGINT while global step ``at`` runs."""

    def __init__(self, at):
        self.at = at

    def before_step(self, trainer):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_stops_training_after_the_step_with_a_checkpoint(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path / "run", **{"schedule.epochs": 3}), hooks=[_CtrlCAt(4)])
    summary = trainer.fit()  # 3 steps per epoch: the Ctrl-C comes during epoch 1, step 1
    assert summary["stopped"] == "interrupted (Ctrl-C)" and summary["global_step"] == 5
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-000000005.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    assert not (tmp_path / "run" / "preempted.json").exists()  # a user's Ctrl-C is not a preemption to requeue


class _SignalDispositions(torch.utils.data.Dataset):
    """Each item: this worker's pid and whether it ignores SIGTERM and SIGUSR1."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return os.getpid(), [signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1)]


def test_loader_workers_worker_init_meant_for_their_rank():
    """torchrun signals the rank's process group; the worker must survive it for the rank to checkpoint."""
    from torch.utils.data import DataLoader

    def batches(worker_init_fn):
        loader = DataLoader(_SignalDispositions(), batch_size=None, num_workers=1, persistent_workers=True,
                            worker_init_fn=worker_init_fn)
        return loader, iter(loader)

    _, plain = batches(None)
    assert next(plain)[1] == [False, False]  # torch's own worker: SIGTERM from anyone but its parent kills it
    del plain
    loader, it = batches(worker_init)
    pid, ignored = next(it)
    assert ignored == [True, True]
    os.kill(pid, signal.SIGTERM)  # as torchrun's os.killpg reaches it
    assert [next(it)[0] for _ in range(3)] == [pid] * 3  # the same worker, alive, serves the rest of the epoch
    assert next(iter(loader))[0] == pid  # and the next epoch


def _late_ignoring_worker(go) -> None:
    """A worker that makes itself ignore the signals only after its parent has signalled it."""
    go.poll(30)  # a pipe, not an Event: a worker killed inside Event.wait leaves Event.set waiting for it forever
    worker_init()


@pytest.mark.parametrize("blocked", [True, False])
def test_a_signal_that_reaches_a_starting_worker_waits_until_it_ignores_it(blocked):
    """SIGTERM/SIGINT sent to the group between a worker's fork and its worker_init_fn must not kill it.

    The control (no block) shows the window is real: the same worker dies of the signal.
    """
    context = multiprocessing.get_context("fork")
    go, say_go = context.Pipe(duplex=False)
    worker = context.Process(target=_late_ignoring_worker, args=(go,))
    with workers_starting() if blocked else contextlib.nullcontext():
        worker.start()
    os.kill(worker.pid, signal.SIGTERM)  # before it ignores anything
    os.kill(worker.pid, signal.SIGINT)
    say_go.send(True)
    worker.join(30)
    assert worker.exitcode == (0 if blocked else -signal.SIGTERM)
    # The parent's own mask is back as it was: the rank still receives its signals.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_ctrl_c_while_workers_start_is_recorded_not_raised():
    """Another thread (pin memory, logging) takes the process's SIGINT while this thread masks it: Python runs
    the handler in this thread mid-block (inside DataLoader's ``__init__``); it only records the request."""
    import threading
    import time

    other = threading.Event()
    helper = threading.Thread(target=other.wait, args=(30,), daemon=True)  # started unmasked
    helper.start()
    try:
        with lifecycle.handling_stops():
            with workers_starting():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the kernel has handed it to the helper; Python has checked for it
                reached_the_end = True
            assert lifecycle.stop_requested() == "SIGINT"
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
        from fastmeal.lifecycle import worker_init
        loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,
                            worker_init_fn=worker_init)
        it = iter(loader)
        next(it)
        print(*(w.pid for w in it._workers))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]
    for pid in map(int, done.stdout.split()):
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its process"


# --------------------------------------------------------------------------------------------
# Every stop signal at every moment, through `fastmeal train`, on both backends with workers
# --------------------------------------------------------------------------------------------

_SIGNAL_AT = textwrap.dedent("""
    import contextlib, os, signal, sys
    from fastmeal.cli import main

    moment, signum = sys.argv.pop(1), getattr(signal, sys.argv.pop(1))

    def send():
        os.killpg(0, signum)  # the whole group, as a terminal's Ctrl-C, torchrun or SLURM reach it

    if moment == "start-up":
        from fastmeal.models import factory
        build = factory.build_student
        factory.build_student = lambda cfg: (send(), build(cfg))[1]
    elif moment == "mid-epoch":  # while global step 4 (epoch 1, step 1) runs
        from fastmeal.trainer import Trainer
        step = Trainer.train_step
        Trainer.train_step = lambda self, batch: (self.global_step == 4 and send(), step(self, batch))[1]
    elif moment == "save":  # inside epoch 0's first epoch-end save (global step 3), before torch.save writes
        from fastmeal import checkpoint
        save, sent = checkpoint.atomic_torch_save, []

        def atomic_torch_save(obj, path, **kw):
            if path.name.endswith("3.pt") and not sent:
                sent.append(send())
            return save(obj, path, **kw)

        checkpoint.atomic_torch_save = atomic_torch_save
    else:  # "worker start": while the train loader's worker processes are being started
        from fastmeal.data import torchvision
        starting = torchvision.workers_starting

        @contextlib.contextmanager
        def workers_starting():
            with starting():
                send()
                yield

        torchvision.workers_starting = workers_starting
    sys.exit(main(sys.argv[1:]))
""")

# moment -> (global step of the checkpoint the stop writes, or None, and its (epoch, step in epoch))
_STOPS_AT = {"start-up": None, "mid-epoch": (5, (1, 2)), "save": (3, (1, 0)), "worker start": (1, (0, 1))}


# DALI starts no worker processes (its threads live in the rank): no "worker start" moment there.
_MOMENTS = [*((m, "torchvision") for m in _STOPS_AT),
            *(pytest.param(m, "dali", marks=pytest.mark.dali) for m in _STOPS_AT if m != "worker start")]


@pytest.mark.slow
@pytest.mark.parametrize(("moment", "backend"), _MOMENTS)
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_each_stop_signal_at_each_moment_checkpoints_and_exits_with_its_code(stop_data, tmp_path, moment, backend,
                                                                            name):
    from test_hardening import finish, one_error_line, start, train_args

    run_dir = tmp_path / "run"
    proc = start([moment, name, *train_args(stop_data, run_dir, "schedule.epochs=2", "data.workers=2",
                                            f"data.backend={backend}")], script=_SIGNAL_AT)
    rc, out, err = finish(proc, timeout=240)  # and no process of its session is left
    stop = _STOPS_AT[moment]
    checkpoints = run_dir / "checkpoints"
    if name == "SIGINT":
        assert rc == 130 and "interrupted (Ctrl-C)" in one_error_line(err)
    else:
        assert rc == 0 and "Traceback" not in err and "fastmeal: " not in err, err[-3000:]
        summary = json.loads(out)
        assert summary["stopped"] == f"preempted by {name}"
        assert summary["global_step"] == (stop[0] if stop else 0)
    if stop is None:
        assert not checkpoints.exists() and not (run_dir / "preempted.json").exists()
        return
    state = load_checkpoint(checkpoints / f"ckpt-{stop[0]:09d}.pt")
    assert (state["epoch"], state["step_in_epoch"]) == stop[1]
    assert json.loads((checkpoints / "manifest.json").read_text())["latest"] == f"ckpt-{stop[0]:09d}.pt"
    assert (run_dir / "preempted.json").exists() == (name != "SIGINT")


@pytest.fixture(scope="module")
def stop_data(tmp_path_factory):
    from tiny import jpeg_dataset

    return jpeg_dataset(tmp_path_factory.mktemp("stops") / "data", train_per_class=4, val_per_class=2)
