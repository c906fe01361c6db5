"""``fastmeal table run``: the plan's stages as subprocesses on this node, resumable after any kill.

``OUT/table_plan.json`` is the plan the folder belongs to; ``OUT/table_state.json`` records every stage
(pending, running with its pid and devices, done, failed, stopped; attempts and seconds). Both are
written atomically. A stage is skipped only after its output is verified (:func:`verify_stage`), whatever
the state file says, so a table killed between a stage's end and the state write loses nothing, and a
stage recorded done whose output was damaged since is run again (it resumes).

Each stage runs in its own process group with ``PR_SET_PDEATHSIG``: when the table process dies (even
by SIGKILL) its stages get SIGTERM, checkpoint and exit, as a preempted run does; the next start waits
for them before it resumes their run dirs. SIGTERM, SIGUSR1 and Ctrl-C of the table are passed on to
the running stages (SIGTERM for both preemption signals, which every torchrun forwards; SIGINT for
Ctrl-C), the table waits for them and exits 0 (preempted: run the same command to continue) or 130.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastmeal import lifecycle
from fastmeal.checkpoint import atomic_write_bytes
from fastmeal.console import format_duration
from fastmeal.table.plan import (
    MAX_RESTARTS,
    PLAN_FILE,
    STATE_FILE,
    Plan,
    Stage,
    TableError,
    _gb,
    read_json,
    simulate,
)

log = logging.getLogger("fastmeal.table")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------------------------
# Verifying a finished stage
# --------------------------------------------------------------------------------------------


def verify_stage(stage: Stage) -> tuple[bool, str]:
    """Whether ``stage``'s output is complete and intact, and why not."""
    out = Path(stage.output)
    if stage.kind == "data":
        from fastmeal.data.synthetic import MARKER_FILE

        return (True, "complete") if (out / MARKER_FILE).is_file() else (False, f"{out / MARKER_FILE} missing")
    if stage.kind == "bank":
        from fastmeal.bank import store

        try:
            store.read_manifest(out)
            complete = store.complete_epochs(out)
        except store.BankError as err:
            return False, str(err)
        missing = [e for e in range(stage.epochs) if e not in complete or not store.epoch_file(out, e).is_file()]
        return (not missing, "complete" if not missing else f"{len(missing)} of {stage.epochs} epochs unfinished")
    if stage.kind in ("train", "teacher"):
        return verify_run(out, stage.epochs)
    result = Path(stage.result or "")
    try:
        doc = json.loads(result.read_text())
        float(doc["top1"])
        float(doc["top5"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"no result in {result}"
    return True, "complete"


def verify_run(run_dir: Path, epochs: int) -> tuple[bool, str]:
    """A run is finished when its newest valid checkpoint is at the end of ``epochs``, the manifest names it,
    and the exports ``student_last``/``student_best`` (``.safetensors`` and ``.pth``) are present and load;
    ``student_last`` must hold exactly the checkpoint's student."""
    import torch
    from safetensors.torch import load_file

    from fastmeal.checkpoint import CheckpointManager

    manager = CheckpointManager(run_dir / "checkpoints", export_dir=run_dir, enabled=False)
    path, state, _ = manager.find_latest_valid()
    if state is None:
        return False, "no valid checkpoint"
    if int(state["epoch"]) < epochs or int(state["step_in_epoch"]):
        return False, f"at epoch {state['epoch']} step {state['step_in_epoch']} of {epochs} epochs"
    if (manager.manifest() or {}).get("latest") != path.name:
        return False, f"{manager.manifest_path} does not describe {path.name} (a save was cut short)"
    try:
        for stem in ("student_last", "student_best"):
            load_file(run_dir / f"{stem}.safetensors")
            torch.load(run_dir / f"{stem}.pth", map_location="cpu", weights_only=True)
        last = load_file(run_dir / "student_last.safetensors")
    except Exception as err:  # a missing or damaged export fails in many ways
        return False, f"an export is missing or damaged ({type(err).__name__}: {str(err)[:80]})"
    student = state["student"]
    if set(last) != set(student) or any(not torch.equal(last[k], student[k].cpu()) for k in student):
        return False, "student_last.safetensors does not hold the final checkpoint's student"
    return True, "complete"


# --------------------------------------------------------------------------------------------
# The state file
# --------------------------------------------------------------------------------------------


@dataclass
class StageState:
    state: str = "pending"  # pending | running | done | failed | stopped
    attempts: int = 0
    seconds: float = 0.0  # wall-clock over all attempts
    pid: int | None = None
    devices: list[int] = field(default_factory=list)
    rc: int | None = None
    started: float | None = None
    finished: float | None = None
    gpus: int = 0


def read_state(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


class StateFile:
    """``OUT/table_state.json``, rewritten atomically on every change."""

    def __init__(self, out: Path, digest: str, stages: dict[str, StageState]) -> None:
        self.path, self.digest, self.stages = out / STATE_FILE, digest, stages

    def save(self) -> None:
        doc = {"format": "fastmeal-table-state", "digest": self.digest, "updated": time.time(),
               "stages": {name: vars(s) for name, s in self.stages.items()}}
        atomic_write_bytes(self.path, (json.dumps(doc, indent=1) + "\n").encode())


# --------------------------------------------------------------------------------------------
# Opening a table folder
# --------------------------------------------------------------------------------------------


def open_table(plan: Plan, *, replan: bool, say: Callable[[str], None] = print) -> StateFile:
    """Check ``OUT`` against the plan (or re-plan it) and the free disk, then write the plan and the state.

    Stages left running by a table process that died are waited for first; then every stage's output is
    verified, and the state says ``done`` exactly for the verified ones (finished stages are kept).

    Raises:
        TableError: another plan in ``OUT`` without ``replan``, or not enough disk; nothing is written then.
    """
    out = Path(plan.spec.out)
    digest = plan.digest()
    old_plan = read_json(out / PLAN_FILE)
    old_state = read_state(out) or {}
    old_stages = old_state.get("stages", {}) if old_state.get("digest") == (old_plan or {}).get("digest") else {}
    if old_plan is not None and old_plan.get("digest") != digest:
        old = {s["name"]: s for s in old_plan.get("stages", [])}
        changed = sorted({s.name for s in plan.stages if old.get(s.name, {}).get("argv") != s.argv} | (
            set(old) - {s.name for s in plan.stages}))
        if not replan:
            raise TableError(f"{out} holds another table plan (it differs in: {', '.join(changed[:6])}"
                             f"{', ...' if len(changed) > 6 else ''}): run the command that made it, use another "
                             "--out, or add --replan (keeps the finished stages that still fit)")
        keep = _kept_stages(plan, old)
        for stage in plan.stages:
            if stage.name not in keep and Path(stage.output).exists():
                aside = Path(f"{stage.output}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(stage.output, aside)
                say(f"table: --replan: {stage.name} changed (or a stage it needs did); its old output is kept "
                    f"aside as {aside}")
        old_stages = {k: v for k, v in old_stages.items() if k in keep}
    for name, prev in old_stages.items():
        pid = prev.get("pid")
        if prev.get("state") == "running" and pid and _is_fastmeal(pid):
            say(f"{name}: waiting for pid {pid}, left running by a table process that ended, to checkpoint and exit")
            while _is_fastmeal(pid):
                time.sleep(0.5)
    stages = {}
    for stage in plan.stages:
        prev = old_stages.get(stage.name, {})
        ok, why = verify_stage(stage)
        recorded = prev.get("state", "pending")
        if ok and recorded != "done" and prev:
            say(f"{stage.name}: finished (verified: {why}); recorded as done")
        elif not ok and recorded == "done":
            say(f"{stage.name}: recorded as done but {why}: it runs again (and resumes)")
        stages[stage.name] = StageState(attempts=int(prev.get("attempts", 0)), seconds=float(prev.get("seconds", 0.0)),
                                        state="done" if ok else "pending", gpus=stage.gpus,
                                        started=prev.get("started"), finished=prev.get("finished"))
    check_disk(plan, {n for n, st in stages.items() if st.state == "done"})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PLAN_FILE, (json.dumps(plan.to_json(), indent=1) + "\n").encode())
    state = StateFile(out, digest, stages)
    state.save()
    return state


def _kept_stages(plan: Plan, old: dict[str, dict[str, Any]]) -> set[str]:
    """Stages whose command is unchanged and whose every dependency is kept (a changed bank invalidates its
    students)."""
    keep: set[str] = set()
    for stage in plan.stages:  # stages are listed after their dependencies
        if old.get(stage.name, {}).get("argv") == stage.argv and all(d in keep for d in stage.deps):
            keep.add(stage.name)
    return keep


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_disk(plan: Plan, done: set[str]) -> None:
    """Refuse to start when the stages left need more disk than ``OUT``'s file system has free."""
    out = Path(plan.spec.out)
    need = sum(max(s.disk_bytes - _size(Path(s.output)), 0) for s in plan.stages if s.name not in done)
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise TableError(f"not enough disk for the banks and checkpoints: the stages left need about {_gb(need)} in "
                         f"{out}, and {_gb(free)} is free there; free some space or use another --out")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a killed table leaves its stages running
        return None


_PRCTL = _load_prctl()  # looked up here, not in the forked child (which should only make system calls)


def _child_setup() -> None:
    """In the stage's process, before exec: its own process group (the table forwards signals to it), and
    SIGTERM when the table process dies, however it dies."""
    os.setpgid(0, 0)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def local_argv(stage: Stage) -> list[str]:
    """What ``run`` executes: the plan's command with this interpreter (``torchrun`` = ``-m torch.distributed.run``)."""
    if stage.gpus <= 1:
        return [sys.executable, "-m", "fastmeal", *stage.argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stage.gpus),
            "--max-restarts", str(MAX_RESTARTS), "-m", "fastmeal", *stage.argv]


@dataclass
class _Running:
    stage: Stage
    proc: subprocess.Popen
    log: IO[str]
    stdout: IO[str] | None
    start: float


class TableRunner:
    """The main loop: start ready stages on free devices (critical path first), watch them, pass signals on."""

    def __init__(self, plan: Plan, state: StateFile, *, status_every: float = 60.0,
                 echo: Callable[[str], None] = print) -> None:
        self.plan, self.state = plan, state
        self.out = Path(plan.spec.out)
        self.status_every = status_every
        self.echo = echo
        self.logs = self.out / "logs"
        self.table_log = self.out / "table.log"
        self.devices = list(range(plan.spec.gpus_per_node))
        self.running: dict[str, _Running] = {}
        self.signal: int | None = None
        self._stops_seen = 0  # how many of lifecycle's stop requests were passed on
        self.failure: tuple[Stage, int] | None = None
        from fastmeal.table.plan import priorities

        self.priority = priorities(plan.stages)

    # ------------------------------------------------------------------ output
    def say(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        self.echo(line)
        with self.table_log.open("a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ signals
    def _pass_on_stops(self) -> None:
        """Pass each new stop request (fastmeal.lifecycle records them) on to the running stages' process groups."""
        requests = lifecycle.stop_requests()
        for name in requests[self._stops_seen:]:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            first = self.signal is None
            self.signal = signum if first or signum == signal.SIGINT else self.signal
            forward = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
            for r in self.running.values():
                try:
                    os.killpg(r.proc.pid, forward)
                except ProcessLookupError:
                    pass
        self._stops_seen = len(requests)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        table_start = time.perf_counter()
        last_status = 0.0
        with lifecycle.handling_stops():
            while True:
                self._pass_on_stops()
                if self.signal is None and self.failure is None:
                    self._start_ready()
                self._reap()
                if not self.running and (self.signal is not None or self.failure is not None or self._all_done()
                                         or not self._ready()):
                    break
                if time.perf_counter() - last_status >= self.status_every:
                    self._status()
                    last_status = time.perf_counter()
                time.sleep(0.2)
        return self._finish(time.perf_counter() - table_start)

    def _all_done(self) -> bool:
        return all(s.state == "done" for s in self.state.stages.values())

    def _ready(self) -> list[Stage]:
        st = self.state.stages
        ready = [s for s in self.plan.stages if st[s.name].state == "pending" and s.name not in self.running
                 and all(st[d].state == "done" for d in s.deps)]
        return sorted(ready, key=lambda s: -self.priority[s.name])

    def _free_devices(self) -> list[int]:
        used = {d for r in self.running.values() for d in self.state.stages[r.stage.name].devices}
        return [d for d in self.devices if d not in used]

    def _start_ready(self) -> None:
        for stage in self._ready():
            if self.devices:
                free = self._free_devices()
                if len(free) < stage.gpus:
                    continue
                devices = free[:stage.gpus]
            else:
                if self.running:  # the CPU runs one stage at a time (they would share its cores)
                    return
                devices = []
            self._launch(stage, devices)

    def _launch(self, stage: Stage, devices: list[int]) -> None:
        st = self.state.stages[stage.name]
        if stage.kind == "data":
            _clear_partial_dataset(Path(stage.output))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        elif not self.devices:
            # Loader workers and torch's OpenMP threads share the CPU: spinning threads starve each other
            # (fastmeal demo sets the same, see cli.cmd_demo).
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        log_path = self.logs / f"{stage.name}.log"
        log_file = log_path.open("a")
        log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {st.attempts + 1}: "
                       f"{stage.command()}\n")
        log_file.flush()
        stdout = None
        if stage.result:
            Path(stage.result).parent.mkdir(parents=True, exist_ok=True)
            stdout = open(f"{stage.result}.partial", "w")  # noqa: SIM115 - closed in _reap
        proc = subprocess.Popen(local_argv(stage), stdout=stdout or log_file, stderr=log_file, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=_child_setup)  # noqa: PLW1509 - single thread
        self.running[stage.name] = _Running(stage, proc, log_file, stdout, time.perf_counter())
        st.state, st.pid, st.devices, st.rc = "running", proc.pid, devices, None
        st.attempts += 1
        st.started = time.time()
        self.state.save()
        where = f"GPU {','.join(map(str, devices))}" if devices else "CPU"
        self.say(f"{stage.name}: started on {where} (pid {proc.pid}; log {log_path})")

    def _reap(self) -> None:
        for name, r in list(self.running.items()):
            rc = r.proc.poll()
            if rc is None:
                continue
            del self.running[name]
            r.log.close()
            if r.stdout is not None:
                r.stdout.close()
            st = self.state.stages[name]
            st.seconds += time.perf_counter() - r.start
            st.rc, st.pid, st.devices = rc, None, []
            if rc == 0 and r.stage.result:
                partial = Path(f"{r.stage.result}.partial")
                atomic_write_bytes(r.stage.result, partial.read_bytes())
                partial.unlink()
            ok, why = verify_stage(r.stage) if rc == 0 else (False, f"exit code {rc}")
            if ok:
                st.state, st.finished = "done", time.time()
                self.say(f"{name}: done in {format_duration(time.perf_counter() - r.start)}")
            elif self.signal is not None or self.failure is not None:
                st.state = "stopped"
                self.say(f"{name}: stopped ({why}); it continues when the table runs again")
            else:
                st.state = "failed"
                code = rc if rc != 0 else EXIT_FAILED
                if rc == 0:
                    why = f"exited 0 but is not finished: {why} (stopped by a signal from outside the table?)"
                self.failure = self.failure or (r.stage, code)
                self.say(f"{name}: FAILED ({why}); log {self.logs / (name + '.log')}")
                for other in self.running.values():  # the others checkpoint and stop: nothing finished is lost
                    os.killpg(other.proc.pid, signal.SIGTERM)
            self.state.save()

    # ------------------------------------------------------------------ status
    def _status(self) -> None:
        remaining = []
        for stage in self.plan.stages:
            st = self.state.stages[stage.name]
            if st.state == "done":
                continue
            copy = Stage(**{**vars(stage), "deps": [d for d in stage.deps if self.state.stages[d].state != "done"]})
            if stage.name in self.running:
                line, left = self._progress(stage, time.perf_counter() - self.running[stage.name].start)
                self.say(f"  {stage.name}: running, {line}")
                copy.seconds, copy.deps = left, []
            remaining.append(copy)
        if remaining:
            # A running stage's devices are taken; the estimate packs the rest as the plan does.
            eta = simulate(remaining, self.plan.spec)
            done = sum(s.state == "done" for s in self.state.stages.values())
            basis = "measured rates" if self.plan.estimate["all_measured"] else "DEFAULT estimates"
            self.say(f"table: {done}/{len(self.plan.stages)} stages done; table ETA {format_duration(eta)} "
                     f"(progress of the running stages, {basis} for the rest)")

    def _progress(self, stage: Stage, elapsed: float) -> tuple[str, float]:
        """``"epoch 3/40, 123 img/s, ETA 0:01:02"`` and the seconds left (the plan's estimate when nothing is known)."""
        fallback = max(stage.seconds - elapsed, 0.0)
        if stage.kind in ("train", "teacher"):
            from fastmeal.report import ReportError, eta_seconds, load_run, mean_rate

            try:
                run = load_run(stage.output)
            except ReportError:
                return f"starting, ETA {format_duration(fallback)} (estimate)", fallback
            rate, eta = mean_rate(run), eta_seconds(run)
            left = eta if eta is not None else fallback
            return (f"epoch {run.epochs_done}/{stage.epochs}, "
                    f"{f'{rate:.0f} img/s' if rate else '? img/s'}, ETA {format_duration(left)}"
                    + ("" if eta is not None else " (estimate)")), left
        if stage.kind == "bank":
            from fastmeal.bank import store

            done = len(store.complete_epochs(stage.output)) if Path(stage.output, "manifest.json").exists() else 0
            left = elapsed / done * (stage.epochs - done) if done else fallback
            return f"epoch {done}/{stage.epochs} built, ETA {format_duration(left)}", left
        return f"ETA {format_duration(fallback)} (estimate)", fallback

    # ------------------------------------------------------------------ the end
    def _finish(self, seconds: float) -> int:
        self._status()
        if self.failure is not None:
            stage, code = self.failure
            print(f"fastmeal: error: stage {stage.name} failed with exit code {code}; log: "
                  f"{self.logs / (stage.name + '.log')}; finished stages stay finished: fix the cause and run the "
                  "same command to continue", file=sys.stderr)
            return code if code in (EXIT_FAILED, EXIT_BAD_INPUT) else EXIT_FAILED
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            self.say(f"table: stopped by {name} after {format_duration(seconds)}; the running stages checkpointed "
                     "(Ctrl-C: from their last checkpoint); run the same command to continue")
            return EXIT_INTERRUPTED if self.signal == signal.SIGINT else EXIT_OK
        if not self._all_done():
            waiting = [n for n, s in self.state.stages.items() if s.state != "done"]
            print(f"fastmeal: error: stages {', '.join(waiting)} cannot start (a dependency failed?)", file=sys.stderr)
            return EXIT_FAILED
        self.say(f"table: every stage done ({format_duration(seconds)} this run); the table: fastmeal table report "
                 f"--out {self.out}")
        return EXIT_OK


def _is_fastmeal(pid: int) -> bool:
    try:
        return b"fastmeal" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _clear_partial_dataset(out: Path) -> None:
    """A synth that was killed leaves train/ and val/ without its marker, which a new synth refuses to mix with:
    they are this stage's own partial output."""
    from fastmeal.data.synthetic import MARKER_FILE

    if not (out / MARKER_FILE).exists():
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)


def run_table(plan: Plan, *, replan: bool = False, status_every: float = 60.0) -> int:
    """Open (or continue) the table in ``plan.spec.out`` and run what is left; returns the exit code."""
    state = open_table(plan, replan=replan)
    runner = TableRunner(plan, state, status_every=status_every)
    runner.say(f"table: {len(plan.stages)} stages in {plan.spec.out} (plan {plan.digest()}); "
               f"{sum(s.state == 'done' for s in state.stages.values())} already done")
    return runner.run()
