"""A Ctrl-C that a library drops (prints as "ignored") still stops the run: fastmeal.signals.ctrl_c_remembered."""

import signal
import sys

import pytest
from tiny import make_trainer, tiny_config

from fastmeal.signals import ctrl_c_remembered, raise_if_interrupted
from fastmeal.trainer import TrainerHook


class _DropsKeyboardInterrupt:
    """Its finaliser takes a Ctrl-C: Python runs the SIGINT handler inside ``__del__`` and drops its exception."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_dropped_in_a_finaliser_is_raised_again_at_the_next_check(monkeypatch):
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    with ctrl_c_remembered():
        _DropsKeyboardInterrupt()  # collected at once: the KeyboardInterrupt is raised and dropped there
        assert dropped == [KeyboardInterrupt]  # what happens without the block too: the program goes on
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # the block's end forgets it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background (nohup, &)
    try:
        with ctrl_c_remembered():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)


class _SwallowsCtrlC(TrainerHook):
    """A library that catches the KeyboardInterrupt of a Ctrl-C arriving during step 2 and carries on."""

    def after_step(self, trainer, parts):
        if trainer.global_step == 2:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass


def test_training_stops_before_the_step_after_a_dropped_ctrl_c(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path / "run", **{"schedule.epochs": 3}), hooks=[_SwallowsCtrlC()])
    with ctrl_c_remembered(), pytest.raises(KeyboardInterrupt):
        trainer.fit()  # 3 steps per epoch: without the check it would train all 9
    assert trainer.global_step == 2
