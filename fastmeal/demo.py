"""``fastmeal demo``: MEAL V2 end to end on the CPU in a few minutes, on data it generates itself.

Stages, all through the one trainer (variants are configs):

1. synthesise a small JPEG dataset in ImageFolder layout (:func:`fastmeal.data.synthetic.synthesize`);
2. train two small teachers with hard labels (``loss.mode=ce``);
3. train the student with hard labels: the baseline;
4. MEAL V2-distil the student from the two teachers, **starting from the baseline's weights** (the
   paper starts from pretrained students, SPEC). Teachers and student are loaded from the weights
   files stages 2–3 wrote (``model.teachers=tag@FILE``, ``model.student_weights=FILE``): the same
   local-weights path a user takes with downloaded weights;
5. the control: the baseline trained on with hard labels for as many epochs as the distillation,
   with the same schedule. The baseline of a tiny CPU run is not converged, so part of "distilled
   beats baseline" is the extra epochs; "distilled beats control" is what distillation adds;
6. the soft-label bank: the two teachers run once over every planned crop of the distillation's
   epochs (``fastmeal bank build``), and the same student is distilled again from the stored top-5
   records instead of live teachers, with the same seed (so the same crops). Bank vs online top-1 and
   the wall time of each are printed side by side.

Everything is evaluated on the held-out val split with the SPEC protocol; a table is printed and
written to ``OUT/summary.json`` (keys ``teachers`` — the ensemble's mean-softmax accuracy, with each
member under ``members`` —, ``baseline``, ``distilled`` and ``control``, each with ``top1`` and
``top5``), and ``fastmeal report`` of the distillation and the control goes to ``OUT/report/``.

The distillation stage's settings are the ``demo`` preset (``fastmeal.config.demo``); the teachers'
and the baseline's are derived from it here (:class:`DemoSettings`). Reported accuracies are the last
epoch's: no checkpoint is picked on the val split, which is also the test split here.

Measured with the defaults on a shared 2-core CPU (load 3-5 from other jobs), seeds 0-4, 1,000 val
images: distilled - baseline +8.6, +3.2, +3.9, +6.2, +8.9 top-1 points; distilled - control +2.0,
+1.6, +2.7, +0.7, +1.7; teacher ensembles 70-73%; 183-267 s per run. Settings that lost to the
control (and were dropped): 1,000 train images with 8-10 distillation epochs at 64 or 32 px (KD tied
or trailed continued hard-label training: every model was still under-fitting); two test_resnet
teachers (a better ensemble, no larger margin).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fastmeal import lifecycle
from fastmeal.config import Config, build_config
from fastmeal.console import progress_enabled
from fastmeal.hooks import TrainerHook
from fastmeal.metrics import finite_json
from fastmeal.trainer import Trainer

log = logging.getLogger("fastmeal.demo")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes and the hard-label stages' schedules (the distillation stage is the preset's).

    Attributes:
        num_classes, train_per_class, val_per_class, size_range: the synthetic dataset.
        teacher_epochs, teacher_lr, teacher_lr_steps: each teacher's hard-label training.
        baseline_epochs, baseline_lr, baseline_lr_steps: the student's hard-label training.
        distill_epochs: the MEAL V2 stage (0 = the preset's ``schedule.epochs``).
        control: also train the control (stage 5).
        bank: also build the soft-label bank and distil from it (stage 6).
        overrides: dotted-key overrides applied to the preset before anything else (tests shrink
            the demo with them: image size, models, batch size).
    """

    num_classes: int = 10
    train_per_class: int = 30
    val_per_class: int = 100
    size_range: tuple[int, int] = (64, 112)
    teacher_epochs: int = 40
    teacher_lr: float = 0.1
    teacher_lr_steps: str = "30:0.01"
    baseline_epochs: int = 40
    baseline_lr: float = 0.1
    baseline_lr_steps: str = "30:0.01"
    distill_epochs: int = 0
    control: bool = True
    bank: bool = True
    overrides: tuple[tuple[str, str], ...] = ()


class _MeanSoftmax(nn.Module):
    """The teacher ensemble as one classifier: ``log(mean_k softmax(t_k))`` (what MEAL V2 distils)."""

    def __init__(self, teachers: Any) -> None:
        super().__init__()
        self._teachers = teachers  # a plain attribute: the ensemble is frozen and not an nn.Module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._teachers(images).float().softmax(-1).mean(0).log()


# Offsets of each stage's runtime.seed (10 * seed + offset): teacher i uses i. The control shares the
# distillation's seed, so that both see the same batches in the same order (a paired comparison).
_SEED_OFFSETS = {"baseline": 7, "distilled": 8, "control": 8, "bank_distilled": 8}


def _stage_config(base: Config, out: Path, name: str, seed: int, overrides: dict[str, Any]) -> Config:
    offset = _SEED_OFFSETS.get(name, int(name.removeprefix("teacher")) if name.startswith("teacher") else 9)
    return base.replace({"runtime.run_dir": str(out / name), "runtime.resume": "",
                         "runtime.seed": seed * 10 + offset, **overrides})


class _StageProgress(TrainerHook):
    """One bar per stage over its epochs, showing the latest val top-1 (the trainer's own lines are muted)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.cfg.schedule.epochs, initial=trainer.epoch, desc=f"{self.label:>10}",
                        unit="epoch", disable=not progress_enabled(self.enabled), dynamic_ncols=True)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"val top-1 {record.get('val_top1', float('nan')):.1f}")

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _quiet_training() -> Iterator[None]:
    """Per-epoch trainer, loader and checkpoint lines would be hundreds here: keep warnings only."""
    package, own = logging.getLogger("fastmeal"), logging.getLogger(__name__)
    levels = package.level, own.level
    package.setLevel(max(logging.WARNING, package.getEffectiveLevel()))
    own.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.setLevel(levels[0])
        own.setLevel(levels[1])


def _run_stage(cfg: Config, label: str, *, progress: bool) -> dict[str, Any]:
    from fastmeal.run import build_trainer

    run_dir = Path(cfg.resolved_run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun starts over: no stale checkpoints are picked up
    start = time.perf_counter()
    with _quiet_training():
        summary = build_trainer(cfg, hooks=[_StageProgress(label, progress)]).fit()
    lifecycle.raise_if_stopped()  # a stage stopped by Ctrl-C or SIGTERM (with its checkpoint) ends the demo
    seconds = time.perf_counter() - start
    last = summary["last_eval"]
    log.info("demo: %-9s %s: val top-1 %.2f top-5 %.2f after %d epochs of loss.mode=%s, %.0f s", label,
             cfg.model.student, last["top1"], last["top5"], summary["epochs"], cfg.loss.mode, seconds)
    return {"model": cfg.model.student, "top1": last["top1"], "top5": last["top5"], "val_loss": last["loss"],
            "epochs": summary["epochs"], "seconds": seconds, "train_images_per_s": summary["train_images_per_s"],
            "weights": str(run_dir / "student_last.safetensors")}


def _bank_stages(distill_cfg: Config, out: Path, seed: int, *, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 6: build the bank of the distillation's run, then distil the same student from it."""
    from fastmeal.bank.build import build_bank
    from fastmeal.distributed import DistInfo, resolve_device

    bank_dir = out / "bank"
    if bank_dir.exists():
        shutil.rmtree(bank_dir)
    start = time.perf_counter()
    with _quiet_training():
        built = build_bank(distill_cfg, bank_dir, top_k=distill_cfg.bank.top_k, progress=progress,
                           dist=DistInfo(device=resolve_device(distill_cfg.runtime.device)))
    bank = {"path": str(bank_dir), "build_seconds": time.perf_counter() - start, "top_k": distill_cfg.bank.top_k,
            **{k: built[k] for k in ("captured_mass", "kl", "crops_per_s", "samples", "bytes_per_epoch")}}
    log.info("demo: bank      %d crops in %.1f s (%.0f crops/s), captured mass %.4f, KL %.5f", bank["samples"],
             bank["build_seconds"], bank["crops_per_s"], bank["captured_mass"], bank["kl"])
    cfg = _stage_config(distill_cfg, out, "bank_distilled", seed, {"bank.path": str(bank_dir)})
    return bank, _run_stage(cfg, "bank", progress=progress)


def _evaluate_ensemble(cfg: Config) -> dict[str, Any]:
    from fastmeal.data import build_loader
    from fastmeal.distributed import resolve_device
    from fastmeal.evaluate import evaluate
    from fastmeal.models.factory import build_teachers

    device = resolve_device(cfg.runtime.device)
    loader = build_loader(cfg, "val", device=device)
    result = evaluate(_MeanSoftmax(build_teachers(cfg, device)), loader, device=device, progress=False,
                      all_ranks=False)
    return {"top1": result["top1"], "top5": result["top5"], "val_loss": result["loss"]}


def _device_name(cfg: Config) -> str:
    from fastmeal.distributed import resolve_device

    device = resolve_device(cfg.runtime.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def format_table(summary: dict[str, Any]) -> str:
    """The demo's result table (one row per model)."""
    rows = [(f"teacher {i}", m) for i, m in enumerate(summary["teachers"]["members"])]
    rows += [("teachers (ensemble)", {**summary["teachers"], "model": "mean softmax"}),
             ("baseline (hard labels)", summary["baseline"]), ("distilled (MEAL V2)", summary["distilled"])]
    if "control" in summary:
        rows.append(("control (more hard labels)", summary["control"]))
    if "bank_distilled" in summary:
        rows.append(("distilled from the bank", summary["bank_distilled"]))
    lines = [f"{'':28}{'model':20}{'top-1':>8}{'top-5':>8}{'wall s':>9}{'img/s':>8}"]
    for role, r in rows:
        wall = f"{r['seconds']:9.1f}" if "seconds" in r else f"{'':9}"
        rate = f"{r['train_images_per_s']:8.0f}" if "train_images_per_s" in r else f"{'':8}"
        lines.append(f"{role:28}{r['model']:20}{r['top1']:8.2f}{r['top5']:8.2f}{wall}{rate}")
    lines.append(f"distilled - baseline: {summary['margin_top1']:+.2f} top-1, {summary['margin_top5']:+.2f} top-5 "
                 "(points)" + (f"; distilled - control: {summary['margin_over_control_top1']:+.2f} top-1"
                               if "control" in summary else ""))
    if "bank_distilled" in summary:
        bank, online = summary["bank"], summary["distilled"]
        lines.append(f"bank vs online: top-1 {summary['bank_distilled']['top1']:.2f} vs {online['top1']:.2f} "
                     f"({summary['bank_minus_online_top1']:+.2f}); wall {bank['build_seconds']:.1f} s build + "
                     f"{summary['bank_distilled']['seconds']:.1f} s train vs {online['seconds']:.1f} s online; "
                     f"top-{bank['top_k']} keeps {100 * bank['captured_mass']:.2f}% of the mass, "
                     f"KL(p || decoded) {bank['kl']:.4f}")
    lines.append(f"total {summary['total_seconds']:.0f} s on {summary['device']}")
    return "\n".join(lines)


def run_demo(out: str | Path = "demo_out", *, seed: int = 0, settings: DemoSettings | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the stages and write ``OUT/summary.json``; returns the summary (also printed as a table).

    Args:
        out: output folder: ``data/``, one run dir per stage, ``summary.json``.
        seed: the dataset's seed; each stage trains with ``runtime.seed = 10 * seed + offset``.
        settings: sizes and hard-label schedules (default: :class:`DemoSettings`).
        progress: progress bars.
    """
    from fastmeal.data.synthetic import synthesize

    settings = settings or DemoSettings()
    out = Path(out)
    start = time.perf_counter()
    base = build_config("demo", overrides={
        "data.root": str(out / "data"), "model.num_classes": settings.num_classes,
        "logging.progress_bar": False, **dict(settings.overrides)})
    if settings.distill_epochs:
        base = base.replace({"schedule.epochs": settings.distill_epochs})

    log.info("demo: writing the dataset to %s", out / "data")
    synthesize(out / "data", num_classes=settings.num_classes, train_per_class=settings.train_per_class,
               val_per_class=settings.val_per_class, seed=seed, size_range=settings.size_range, progress=progress,
               force=True)  # the demo's own folder: a rerun replaces the dataset it wrote, nothing else

    hard_labels = {"loss.mode": "ce", "model.pretrained": False, "model.student_weights": ""}
    teachers = []
    for i, teacher in enumerate(base.model.teachers):
        cfg = _stage_config(base, out, f"teacher{i}", seed, {
            **hard_labels, "model.student": teacher.tag, "schedule.epochs": settings.teacher_epochs,
            "optim.lr": settings.teacher_lr, "schedule.lr_steps": settings.teacher_lr_steps})
        teachers.append(_run_stage(cfg, f"teacher {i}", progress=progress))
    baseline = _run_stage(_stage_config(base, out, "baseline", seed, {
        **hard_labels, "schedule.epochs": settings.baseline_epochs, "optim.lr": settings.baseline_lr,
        "schedule.lr_steps": settings.baseline_lr_steps}), "baseline", progress=progress)

    # Stage 3 reads the files stages 1-2 wrote, as a user passes downloaded weights.
    distill_cfg = _stage_config(base, out, "distilled", seed, {
        "loss.mode": "meal_v2", "model.student_weights": baseline["weights"],
        "model.teachers": ",".join(f"{t.tag}@{r['weights']}" for t, r in zip(base.model.teachers, teachers,
                                                                              strict=True))})
    distilled = _run_stage(distill_cfg, "distilled", progress=progress)
    with _quiet_training():
        ensemble = _evaluate_ensemble(distill_cfg)
    control = None
    if settings.control:
        # Same start, epochs, LR regime and seed as the distillation; hard labels instead of teachers.
        control = _run_stage(_stage_config(base, out, "control", seed, {
            **hard_labels, "model.student_weights": baseline["weights"]}), "control", progress=progress)

    bank = bank_distilled = None
    if settings.bank:
        bank, bank_distilled = _bank_stages(distill_cfg, out, seed, progress=progress)

    summary = {
        "teachers": {**ensemble, "members": teachers},
        "baseline": baseline,
        "distilled": distilled,
        "margin_top1": distilled["top1"] - baseline["top1"],
        "margin_top5": distilled["top5"] - baseline["top5"],
        **({"control": control, "margin_over_control_top1": distilled["top1"] - control["top1"]} if control else {}),
        **({"bank": bank, "bank_distilled": bank_distilled,
            "bank_minus_online_top1": bank_distilled["top1"] - distilled["top1"]} if bank else {}),
        "seed": seed,
        "settings": asdict(settings),
        "distill_config": distill_cfg.to_dict(),
        "device": _device_name(distill_cfg),
        "total_seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(finite_json(summary), indent=2, allow_nan=False) + "\n")
    print(format_table(summary))
    print(f"summary written to {out / 'summary.json'}")
    _write_report([out / "distilled", *([out / "control"] if control else [])], out / "report")
    return summary


def _write_report(run_dirs: list[Path], out: Path) -> None:
    """``fastmeal report`` of the distillation (and the control); without matplotlib, how to get it."""
    from fastmeal.report import ReportError, write_report

    try:
        report = write_report(run_dirs, out)
    except ReportError as err:
        print(f"no report: {err}")
        return
    print(f"report written to {report.html} (figures and report.md next to it)")
