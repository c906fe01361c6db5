"""``fastmeal report``: figures of one or more run dirs, a self-contained HTML page and a Markdown summary.

It reads what a run writes (``config.json`` and ``metrics.jsonl``: one ``train`` record per logging
interval, one ``epoch`` record per epoch, see :class:`fastmeal.metrics.MetricsWriter`) and draws:

* ``accuracy.png``: val top-1 and top-5 per epoch; for a paper preset the paper's numbers on the
  same axes (the r50_224 learning curve, the final numbers of the others), the student's accuracy
  before training where it is known, and the LR regime shaded;
* ``loss.png``: the loss parts ``kd``, ``d``, ``kl`` and the total per logging interval (thin) and
  per epoch (markers), on a log scale where the values span more than a decade;
* ``throughput.png``: img/s and data-wait % per interval with their means, and the peak memory
  (CUDA runs).

Several runs share the axes, each labelled by its run dir and the config values that differ between
them. A run still in progress (or killed) is reported on what it has written, with its ETA; a
partial last line in ``metrics.jsonl`` (a killed writer) is skipped with a warning.

matplotlib is optional (``pip install 'fastmeal[report]'``) and imported only here, with the Agg
backend (no display). PNGs are 256-colour and carry no version or date stamp: the same data gives the
same bytes.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmeal.console import format_duration
from fastmeal.metrics import read_jsonl

log = logging.getLogger("fastmeal.report")

INSTALL_HINT = "pip install 'fastmeal[report]' (or: pip install matplotlib)"
DPI = 100
FIGURES = ("accuracy", "loss", "throughput")
LOSS_PARTS = (("kd", "kd: soft cross-entropy to the teachers"), ("d", "d: discriminator BCE"),
              ("kl", "kl: KL(teachers || student)"), ("loss", "total loss (back-propagated)"))
# Config keys that differ between any two runs without saying anything about them.
_IGNORED_DIFFS = frozenset({"runtime.run_dir", "runtime.resume"})


class ReportError(ValueError):
    """A run dir that cannot be reported, or matplotlib missing; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# The paper's numbers (MEAL V2, Shen & Savvides 2020; SPEC "Paper configurations")
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperReference:
    """A preset's published result.

    Attributes:
        top1, top5: final val accuracy (%).
        epochs: the paper's schedule length.
        curve: ``(epoch, top1)`` points of the published learning curve (0-based epochs, accuracy
            after that epoch); only the final point where the paper gives no curve.
        student_init_top1: the pretrained student's accuracy before distillation, where known.
    """

    top1: float
    top5: float
    epochs: int
    curve: tuple[tuple[int, float], ...]
    student_init_top1: float | None = None


def _final_only(top1: float, top5: float, epochs: int = 200, init: float | None = None) -> PaperReference:
    return PaperReference(top1, top5, epochs, ((epochs - 1, top1),), init)


# r50_224: ≈76.2% after epoch 0 (the LR of 0.01 first hurts the 79% start), ≈79.6% at epoch 99,
# ≈80.3% right after the LR drop to 0.001 at epoch 101, 80.67% final. resnet50.ram_in1k starts at
# ≈79.0%, resnet18.tv_in1k at 69.76% (timm's published numbers).
PAPER: dict[str, PaperReference] = {
    "r50_224": PaperReference(80.67, 95.09, 180, ((0, 76.2), (99, 79.6), (101, 80.3), (179, 80.67)), 79.0),
    "r50_224_cutmix": _final_only(80.98, 95.35, 180, 79.0),
    "r50_380": _final_only(81.72, 95.81, 200),
    "r18_224": _final_only(73.19, 90.82, 200, 69.76),
    "mnv3s075_224": _final_only(67.60, 87.23),
    "mnv3s100_224": _final_only(69.65, 88.71),
    "mnv3l100_224": _final_only(76.92, 93.32),
    "effb0_224": _final_only(78.29, 93.95),
}


# --------------------------------------------------------------------------------------------
# matplotlib (optional)
# --------------------------------------------------------------------------------------------


def require_pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or a :class:`ReportError` with the install command."""
    try:
        import matplotlib
    except ImportError as err:
        raise ReportError(f"the report needs matplotlib, which is not installed: {INSTALL_HINT}") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``fig`` as a small PNG atomically and close it.

    Line plots need few colours: the image is reduced to a 256-colour palette (median cut, no
    dithering: deterministic), a third of the RGBA size. There is no version or date stamp, so the
    same drawing gives the same bytes. The visible axes' titles go into the PNG's ``Axes`` text
    field, one per line, so that tools and tests can tell what a file shows.
    """
    from PIL import Image, PngImagePlugin

    plt = require_pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    titles = "\n".join(ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title())
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                        dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    for key, value in {"Axes": titles, **(metadata or {})}.items():
        info.add_text(key, value)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info, optimize=True)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Reading a run dir
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run dir holds, cleaned up for plotting.

    ``train`` holds one record per logging interval, ``epochs`` one per epoch, both sorted and
    de-duplicated (a resumed run re-writes the steps after its checkpoint: the later record wins).
    Accuracies are in percent whatever unit the file used.
    """

    path: Path
    config: dict[str, Any] | None
    train: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    written_at: float | None  # mtime of metrics.jsonl
    warnings: list[str] = field(default_factory=list)
    name: str = ""
    label: str = ""
    initial_top1: tuple[float, str] | None = None  # (top-1 %, where it comes from)

    @property
    def preset(self) -> str | None:
        return (self.config or {}).get("name")

    @property
    def paper(self) -> PaperReference | None:
        return PAPER.get(self.preset or "")

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config or {}
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def total_epochs(self) -> int | None:
        value = self.cfg("schedule.epochs")
        return int(value) if value is not None else None

    @property
    def epochs_done(self) -> int:
        return self.epochs[-1]["epoch"] + 1 if self.epochs else 0

    @property
    def finished(self) -> bool:
        return self.total_epochs is not None and self.epochs_done >= self.total_epochs

    @functools.cached_property
    def steps_per_epoch(self) -> int | None:
        """Steps of a complete epoch (the most logged in one; ``runtime.max_steps_per_epoch`` before any ended)."""
        done = {r["epoch"] for r in self.epochs}
        steps = [r["step"] for r in self.train if r.get("epoch") in done and "step" in r]
        if steps:
            return max(steps)
        return int(self.cfg("runtime.max_steps_per_epoch", 0) or 0) or None

    @functools.cached_property
    def axis_steps(self) -> int:
        """Steps that make one epoch on the plots' epoch axis (before an epoch ended: the most logged so far)."""
        return self.steps_per_epoch or max((r.get("step", 0) for r in self.train), default=1) or 1

    def lr_regime(self) -> list[tuple[int, int, float]]:
        """``(first_epoch, end_epoch, lr)`` spans over the run's schedule (from its config, else its records)."""
        total = self.total_epochs
        if self.config is not None and total is not None and self.cfg("optim.lr") is not None:
            steps = [(0, float(self.cfg("optim.lr")))] + [(int(e), float(lr)) for e, lr in
                                                          self.cfg("schedule.lr_steps", []) if int(e) < total]
        else:
            steps, total = [], self.epochs_done
            for r in self.epochs:
                if not steps or r.get("lr") != steps[-1][1]:
                    steps.append((r["epoch"], r.get("lr")))
        if not steps:  # no LR in the config (`{}`) and no epoch finished yet: no regime to draw
            return []
        ends = [s for s, _ in steps[1:]] + [total]
        return [(start, end, lr) for (start, lr), end in zip(steps, ends, strict=True) if end > start]


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """``metrics.jsonl``'s records and warnings about lines that are not JSON (a killed run's partial line)."""
    bad: list[tuple[int, str]] = []
    rows = read_jsonl(path, on_bad_line=lambda number, line: bad.append((number, line)))
    warnings = []
    for number, line in bad:
        what = "a partial last line (the run was killed while writing it?)" if number == _line_count(path) else \
            "a line that is not JSON"
        warnings.append(f"{path}: skipped {what}: line {number}: {line[:60]!r}")
    return rows, warnings


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def load_run(path: str | os.PathLike) -> Run:
    """Read a run dir (``config.json`` and ``metrics.jsonl``; either may still be missing, not both)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory: give the run dir of a fastmeal run (runtime.run_dir)")
    metrics, config_file = path / "metrics.jsonl", path / "config.json"
    if not metrics.exists() and not config_file.exists():
        raise ReportError(f"{path} has neither metrics.jsonl nor config.json: it is not a fastmeal run dir "
                          "(give the folder runtime.run_dir names, e.g. runs/r50_224)")
    warnings: list[str] = []
    config = None
    if not config_file.exists():
        warnings.append(f"{config_file} is missing: the report has no LR regime, no ETA and no paper numbers")
    else:
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            warnings.append(f"{config_file}: not valid JSON ({err}); reporting without the config")
        if config is not None and not isinstance(config, dict):
            warnings.append(f"{config_file} holds a {type(config).__name__}, not a fastmeal config; reporting "
                            "without it")
            config = None
    records: list[dict[str, Any]] = []
    written_at = None
    if metrics.exists():
        records, bad = read_records(metrics)
        warnings += bad
        written_at = metrics.stat().st_mtime
    else:
        warnings.append(f"{metrics} does not exist yet: the run has not finished its first logging interval")
    train = _last_per((r for r in records if r.get("kind") == "train" and "global_step" in r), "global_step")
    epochs = _last_per((r for r in records if r.get("kind") == "epoch" and "epoch" in r), "epoch")
    _to_percent(train, ("train_top1",))
    _to_percent(epochs, ("train_top1",))
    _to_percent(epochs, ("val_top1", "val_top5", "best_top1"), decide_by="val_top5")
    return Run(path=path, config=config, train=train, epochs=epochs, written_at=written_at, warnings=warnings)


def _last_per(records: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    latest = {}
    for r in records:
        latest[r[key]] = r
    return [latest[k] for k in sorted(latest)]


def _to_percent(records: list[dict[str, Any]], keys: Sequence[str], decide_by: str | None = None) -> None:
    """Scale accuracies written as fractions to percent, in place.

    The trainer writes every accuracy in percent; before that, ``train_top1`` was a fraction. There
    is no unit in the file, so a series whose values all lie in [0, 1] is read as fractions. That
    misreads only a run whose train top-1 (or, for ``decide_by``, val top-5) never passed 1%.
    """
    probe = [r[decide_by or keys[0]] for r in records if _finite(r.get(decide_by or keys[0]))]
    if not probe or max(probe) > 1.0:
        return
    for r in records:
        for k in keys:
            if _finite(r.get(k)):
                r[k] = 100.0 * r[k]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{dotted key: JSON value}``; lists of tables get an index (``model.teachers.0.weights``)."""
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        tree = {str(i): v for i, v in enumerate(tree)}
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree)}


def config_differences(runs: Sequence[Run]) -> list[str]:
    """Dotted config keys whose values differ between the runs (sorted; none for a single run)."""
    if len(runs) < 2:
        return []
    flat = [_flatten(r.config or {}) for r in runs]
    keys = sorted(set().union(*flat) - _IGNORED_DIFFS)
    return [k for k in keys if len({f.get(k) for f in flat}) > 1]


def _short_value(value: str | None, limit: int = 28) -> str:
    """A JSON value for a legend or a table cell: strings unquoted, long ones cut (paths keep their end)."""
    if value is None:
        return "—"
    if value.startswith('"'):
        value = json.loads(value) or "''"
    if len(value) <= limit:
        return value
    return "…" + value[-(limit - 1):] if "/" in value else value[:limit - 1] + "…"


def label_runs(runs: Sequence[Run]) -> list[str]:
    """Give every run a unique short ``name`` and a legend ``label`` (name + the config values that differ)."""
    names = [r.path.name or str(r.path) for r in runs]
    if len(set(names)) < len(names):  # same basename in different places: add the parent
        names = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    diffs = config_differences(runs)
    flats = [_flatten(r.config or {}) for r in runs]
    # The legend names at most two differences with short values (LRs, modes; not paths); the tables have all.
    legend = [k for k in diffs if max(len(f.get(k) or "") for f in flats) <= 20][:2] or diffs[:1]
    for run, name, flat in zip(runs, names, flats, strict=True):
        shown = [f"{k}={_short_value(flat.get(k))}" for k in legend] + (["…"] if len(diffs) > len(legend) else [])
        run.name, run.label = name, name + (f" ({', '.join(shown)})" if shown else "")
    return diffs


def find_initial_top1(run: Run) -> tuple[float, str] | None:
    """The student's val top-1 before training, where known.

    From the run that wrote ``model.student_weights`` when that file sits in another run dir (the
    demo distils from its baseline's ``student_last``), else the paper's number for the preset's
    pretrained student when the run starts from it.
    """
    weights = run.cfg("model.student_weights") or ""
    if weights:
        source = Path(weights)
        if (source.parent / "metrics.jsonl").exists():
            epochs = _last_per((r for r in read_records(source.parent / "metrics.jsonl")[0]
                                if r.get("kind") == "epoch" and "epoch" in r), "epoch")
            _to_percent(epochs, ("val_top1", "val_top5", "best_top1"), decide_by="val_top5")
            key = "best_top1" if source.name.startswith("student_best") else "val_top1"
            if epochs and _finite(epochs[-1].get(key)):
                return float(epochs[-1][key]), f"{source.parent.name}'s {source.stem}"
        return None
    paper = run.paper
    if paper and paper.student_init_top1 is not None and run.cfg("model.pretrained", True):
        return paper.student_init_top1, f"pretrained {run.cfg('model.student')}"
    return None


# --------------------------------------------------------------------------------------------
# Numbers: progress, ETA, throughput
# --------------------------------------------------------------------------------------------


def epoch_position(run: Run, record: dict[str, Any]) -> float:
    """A train record's place on the epoch axis: ``epoch + step / steps_per_epoch``."""
    steps = run.axis_steps
    return record.get("epoch", 0) + record.get("step", steps) / steps


def interval_seconds(record: dict[str, Any]) -> float | None:
    rate, samples = record.get("images_per_s"), record.get("samples")
    if _finite(rate) and rate > 0 and _finite(samples):
        return samples / rate
    return None


def mean_rate(run: Run) -> float | None:
    """Images over seconds of every interval but the first (warm-up: compilation, cudnn autotuning)."""
    steady = run.train[1:] if len(run.train) > 2 else run.train
    pairs = [(r["samples"], s) for r in steady if (s := interval_seconds(r))]
    seconds = sum(s for _, s in pairs)
    return sum(n for n, _ in pairs) / seconds if seconds else None


def mean_data_wait(run: Run) -> float | None:
    """Data wait as a share of wall time over the same intervals as :func:`mean_rate` (0..1)."""
    steady = run.train[1:] if len(run.train) > 2 else run.train
    pairs = [(r["data_wait"] * s, s) for r in steady if (s := interval_seconds(r)) and _finite(r.get("data_wait"))]
    seconds = sum(s for _, s in pairs)
    return sum(w for w, _ in pairs) / seconds if seconds else None


def peak_memory_gb(run: Run) -> float | None:
    values = [r["peak_mem_gb"] for r in run.train if _finite(r.get("peak_mem_gb"))]
    return max(values) if values else None


def eta_seconds(run: Run, window: int = 20) -> float | None:
    """Seconds left at the pace of the last ``window`` intervals plus one evaluation per epoch left.

    None when the run is finished, or when it is not yet known (no config, or no epoch finished
    and no ``runtime.max_steps_per_epoch`` to tell the epoch's length).
    """
    total, steps_per_epoch = run.total_epochs, run.steps_per_epoch
    if run.finished or total is None or not steps_per_epoch or not run.train:
        return None
    seconds = steps = 0.0
    recent = run.train[-(window + 1):]
    for before, after in zip(recent, recent[1:], strict=False):
        s = interval_seconds(after)
        if s is not None and after["global_step"] > before["global_step"]:
            seconds += s
            steps += after["global_step"] - before["global_step"]
    if not steps:
        return None
    last = run.train[-1]
    done_epochs = max(run.epochs_done, last.get("epoch", 0))
    in_epoch = last.get("step", 0) if last.get("epoch", 0) >= run.epochs_done else 0
    steps_left = max(total * steps_per_epoch - done_epochs * steps_per_epoch - in_epoch, 0)
    evals = [r["val_seconds"] for r in run.epochs if _finite(r.get("val_seconds"))]
    eval_left = (sum(evals) / len(evals) if evals else 0.0) * (total - run.epochs_done)
    return steps_left * seconds / steps + eval_left


def run_status(run: Run) -> str:
    """``finished``, or where an unfinished run stands and when it should end."""
    total = run.total_epochs
    if run.finished:
        return f"finished ({run.epochs_done} epoch{'' if run.epochs_done == 1 else 's'})"
    where = f"{run.epochs_done}/{total if total is not None else '?'} epochs done"
    if run.train and run.train[-1].get("epoch", 0) >= run.epochs_done:
        steps = run.steps_per_epoch
        where += f", epoch {run.train[-1]['epoch']} at step {run.train[-1].get('step', '?')}/{steps or '?'}"
    eta = eta_seconds(run)
    if eta is None:
        return f"in progress or stopped: {where}; ETA unknown until an epoch has finished"
    end = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((run.written_at or time.time()) + eta))
    return f"in progress or stopped: {where}; ETA {format_duration(eta)} after the last record (≈ {end})"


def summary_rows(runs: Sequence[Run]) -> list[dict[str, str]]:
    """One row of display strings per run (the Markdown and HTML tables)."""
    rows = []
    for run in runs:
        last = run.epochs[-1] if run.epochs else {}
        paper = run.paper
        rate, wait, mem = mean_rate(run), mean_data_wait(run), peak_memory_gb(run)
        top1 = last.get("val_top1")
        rows.append({
            "run": run.name, "preset": run.preset or "?", "status": run_status(run),
            "val top-1": _pct(top1), "val top-5": _pct(last.get("val_top5")), "best top-1": _pct(last.get("best_top1")),
            "paper top-1": _pct(paper.top1) if paper else "—",
            "vs paper": f"{top1 - paper.top1:+.2f}" if paper and _finite(top1) else "—",
            "start top-1": _pct(run.initial_top1[0]) if run.initial_top1 else "—",
            "mean img/s": f"{rate:.1f}" if rate else "—",
            "data wait %": _pct(100 * wait) if wait is not None else "—",
            "peak mem": f"{mem:.1f} GiB" if mem is not None else "— (not CUDA)",
        })
    return rows


def _pct(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "—"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _colours(n: int) -> list[Any]:
    plt = require_pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _shared_regime(runs: Sequence[Run]) -> list[tuple[int, int, str]] | None:
    """The runs' LR spans when they change LR at the same epochs (labels list each distinct LR), else None."""
    regimes = [r.lr_regime() for r in runs]
    regimes = [g for g in regimes if g]
    if not regimes or any([(s, e) for s, e, _ in g] != [(s, e) for s, e, _ in regimes[0]] for g in regimes):
        return None
    labels = ["/".join(f"{lr:g}" for lr in dict.fromkeys(g[i][2] for g in regimes)) for i in range(len(regimes[0]))]
    return [(s, e, label) for (s, e, _), label in zip(regimes[0], labels, strict=True)]


def _shade_lr(ax: Any, regime: list[tuple[int, int, str]] | None, offset: float) -> None:
    """Shade every second LR span and write each span's LR at the top.

    ``offset``: where epoch ``e`` begins on the x axis relative to ``e`` (-0.5 when a point at ``e``
    stands for the end of epoch ``e``, 0 when the axis counts epochs continuously).
    """
    if not regime:
        return
    for i, (start, end, lr) in enumerate(regime):
        if i % 2:
            ax.axvspan(start + offset, end + offset, color="0.9", zorder=0, lw=0)
        ax.text((start + end) / 2 + offset, 0.98, f"lr {lr}", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8, color="0.35")
    for _, end, _ in regime[:-1]:
        ax.axvline(end + offset, color="0.6", lw=0.8, ls=":", zorder=0)


def _no_data(ax: Any, text: str = "no records yet") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_accuracy(runs: Sequence[Run], path: Path) -> Path:
    plt = require_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    regime = _shared_regime(runs)
    papers = {r.preset: r.paper for r in runs if r.paper}
    panels = ((axes[0], "val_top1", "Validation top-1 (%)"), (axes[1], "val_top5", "Validation top-5 (%)"))
    for ax, key, title in panels:
        ax.set_title(title)
        _shade_lr(ax, regime, -0.5)
        drawn = False
        for run, colour in zip(runs, _colours(len(runs)), strict=True):
            points = [(r["epoch"], r[key]) for r in run.epochs if _finite(r.get(key))]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "-o", color=colour, ms=3, lw=1.5, label=run.label)
                drawn = True
            if key == "val_top1" and run.initial_top1:
                ax.plot([-1], [run.initial_top1[0]], "*", color=colour, ms=11,
                        label=f"{run.name}: start, {run.initial_top1[0]:.2f} ({run.initial_top1[1]})")
                drawn = True
        for preset, paper in papers.items():
            if key == "val_top1":
                xs, ys = zip(*paper.curve, strict=True)
                points = " (published points)" if len(paper.curve) > 1 else ""
                ax.plot(xs, ys, "--s", color="k", ms=4, lw=1, label=f"paper {preset}: {paper.top1:.2f} final{points}")
            else:
                ax.plot([paper.epochs - 1], [paper.top5], "s", color="k", ms=5,
                        label=f"paper {preset}: {paper.top5:.2f} final")
            drawn = True
        if not drawn:
            _no_data(ax, "no epoch has finished yet")
        ax.set_xlabel("epoch (-1: before training)" if any(r.initial_top1 for r in runs) else "epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path)


def _log_helps(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > 10


def plot_losses(runs: Sequence[Run], path: Path) -> Path:
    plt = require_pyplot()
    present = [(k, t) for k, t in LOSS_PARTS if any(_finite(r.get(k)) for run in runs for r in run.train)
               or any(_finite(r.get(f"train_{k}")) for run in runs for r in run.epochs)]
    present = present or [LOSS_PARTS[-1]]
    cols = 2 if len(present) > 1 else 1
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    regime = _shared_regime(runs)
    for ax, (key, title) in zip(axes.flat, present, strict=False):
        ax.set_title(title)
        values: list[float] = []
        for run, colour in zip(runs, _colours(len(runs)), strict=True):
            interval = [(epoch_position(run, r), r[key]) for r in run.train if _finite(r.get(key))]
            per_epoch = [(r["epoch"] + 0.5, r[f"train_{key}"]) for r in run.epochs if _finite(r.get(f"train_{key}"))]
            if interval:
                xs, ys = zip(*interval, strict=True)
                ax.plot(xs, ys, "-", color=colour, lw=0.8, alpha=0.55)
                values += ys
            if per_epoch:
                xs, ys = zip(*per_epoch, strict=True)
                ax.plot(xs, ys, "o-", color=colour, ms=3.5, lw=1.4, label=run.label)
                values += ys
        if not values:
            _no_data(ax)
            continue
        if _log_helps(values):
            ax.set_yscale("log")
            title += " (log scale)"
            ax.set_title(title)
        _shade_lr(ax, regime, 0.0)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_png(fig, path)


def plot_throughput(runs: Sequence[Run], path: Path) -> Path:
    plt = require_pyplot()
    has_memory = any(peak_memory_gb(r) is not None for r in runs)
    fig, axes = plt.subplots(1, 3 if has_memory else 2, figsize=(16 if has_memory else 12, 4.2), squeeze=False)
    axes = list(axes.flat)
    titles = ["Training throughput (img/s)", "Data wait (% of wall time)", "Peak CUDA memory (GiB)"]
    for ax, title in zip(axes, titles, strict=False):
        ax.set_title(title)
    for run, colour in zip(runs, _colours(len(runs)), strict=True):
        rates = [(epoch_position(run, r), r["images_per_s"]) for r in run.train if _finite(r.get("images_per_s"))]
        waits = [(epoch_position(run, r), 100 * r["data_wait"]) for r in run.train if _finite(r.get("data_wait"))]
        memory = [(epoch_position(run, r), r["peak_mem_gb"]) for r in run.train if _finite(r.get("peak_mem_gb"))]
        for ax, points, mean, unit in ((axes[0], rates, mean_rate(run), "img/s"),
                                       (axes[1], waits, _scaled(mean_data_wait(run), 100), "%")):
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "-", color=colour, lw=1, label=run.label)
            if mean is not None:
                ax.axhline(mean, color=colour, ls="--", lw=1, label=f"{run.name}: mean {mean:.1f} {unit}")
        if has_memory and memory:
            xs, ys = zip(*memory, strict=True)
            axes[2].plot(xs, ys, "-", color=colour, lw=1, label=f"{run.name}: max {max(ys):.2f} GiB")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            _no_data(ax)
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    return save_png(fig, path)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    out: Path
    figures: dict[str, Path]
    html: Path
    markdown: Path
    runs: list[Run]
    rows: list[dict[str, str]]
    warnings: list[str]


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> Report:
    """Read the run dirs and write ``OUT/{accuracy,loss,throughput}.png``, ``report.html`` and ``report.md``.

    Args:
        run_dirs: one or more run dirs (``runtime.run_dir``), drawn on the same axes.
        out: the output folder (default: ``RUN_DIR/report`` for one run, ``./report`` for several).

    Raises:
        ReportError: a run dir that is not one, or matplotlib missing (with the install command).
    """
    if not run_dirs:
        raise ReportError("give at least one run dir")
    require_pyplot()  # fail before any work
    runs = [load_run(p) for p in run_dirs]
    diffs = label_runs(runs)
    for run in runs:
        run.initial_top1 = find_initial_top1(run)
    out = Path(out) if out is not None else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    figures = {"accuracy": plot_accuracy(runs, out / "accuracy.png"),
               "loss": plot_losses(runs, out / "loss.png"),
               "throughput": plot_throughput(runs, out / "throughput.png")}
    warnings = [w for r in runs for w in r.warnings]
    for w in warnings:
        log.warning("%s", w)
    rows = summary_rows(runs)
    markdown = _atomic_write(out / "report.md", render_markdown(runs, rows, diffs, figures, warnings))
    page = _atomic_write(out / "report.html", render_html(runs, rows, diffs, figures, warnings))
    return Report(out=out, figures=figures, html=page, markdown=markdown, runs=runs, rows=rows, warnings=warnings)


_CAPTIONS = {
    "accuracy": "Validation accuracy per epoch; the paper's numbers in black (paper presets); star: the "
                "student before training; LR regime shaded.",
    "loss": "Loss parts per logging interval (thin lines) and their epoch means (markers); LR regime shaded.",
    "throughput": "Training images/s and data wait per logging interval; dashed: the means after warm-up.",
}


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _diff_table(runs: Sequence[Run], diffs: Sequence[str]) -> list[list[str]]:
    flat = [_flatten(r.config or {}) for r in runs]
    return [[key, *(_short_value(f.get(key), 60) for f in flat)] for key in diffs]


def render_markdown(runs: Sequence[Run], rows: list[dict[str, str]], diffs: Sequence[str],
                    figures: dict[str, Path], warnings: Sequence[str]) -> str:
    columns = list(rows[0])
    lines = ["# fastmeal report", "", f"Runs: {', '.join(f'`{r.path}`' for r in runs)}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c].replace("|", "\\|") for c in columns) + " |" for row in rows]
    if diffs:
        lines += ["", "Config values that differ:", "", "| key | " + " | ".join(r.name for r in runs) + " |",
                  "|" + "---|" * (len(runs) + 1)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _diff_table(runs, diffs)]
    lines += _paper_lines(runs)
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    for name, path in figures.items():
        lines += ["", f"![{name}]({path.name})", "", _CAPTIONS[name]]
    return "\n".join(lines) + "\n"


def _paper_lines(runs: Sequence[Run]) -> list[str]:
    lines = []
    for preset in dict.fromkeys(r.preset for r in runs if r.paper):
        paper = PAPER[preset]
        curve = ", ".join(f"{top1:.2f} after epoch {epoch}" for epoch, top1 in paper.curve)
        lines.append(f"Paper ({preset}, {paper.epochs} epochs): top-1 {curve}; final top-5 {paper.top5:.2f}.")
    return ["", *lines] if lines else []


HTML_STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1700px}table{border-collapse:collapse;"
              "margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}"
              "th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}.warn{color:#a40}</style>")


def html_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """An HTML table of escaped text cells."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def html_image(name: str, path: Path) -> str:
    """A PNG inlined as a ``data:`` URI (the page opens from disk, alone)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'


def render_html(runs: Sequence[Run], rows: list[dict[str, str]], diffs: Sequence[str],
                figures: dict[str, Path], warnings: Sequence[str]) -> str:
    """One page that opens from disk: inline CSS, figures as ``data:`` URIs, no script, no link."""
    esc = html.escape
    table = html_table
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>fastmeal report</title>',
             HTML_STYLE, "</head><body>", "<h1>fastmeal report</h1>",
             "<p>Runs: " + ", ".join(f"<code>{esc(str(r.path))}</code>" for r in runs) + "</p>",
             table(list(rows[0]), [list(row.values()) for row in rows])]
    if diffs:
        parts += ["<h2>Config values that differ</h2>", table(["key", *(r.name for r in runs)], _diff_table(runs,
                                                                                                            diffs))]
    parts += [f"<p>{esc(line)}</p>" for line in _paper_lines(runs) if line]
    if warnings:
        parts += ["<h2>Warnings</h2><ul>"] + [f'<li class="warn">{esc(w)}</li>' for w in warnings] + ["</ul>"]
    for name, path in figures.items():
        parts += [f"<h2>{esc(name.capitalize())}</h2>", f"<p>{esc(_CAPTIONS[name])}</p>", html_image(name, path)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
