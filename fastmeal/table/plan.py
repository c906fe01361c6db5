"""The plan of a table: banks, which preset trains from which bank or online and why, every stage's exact
command, estimates, disk, and the schedule on M nodes × N GPUs.

A *row* is one trained student (a paper preset, or a student of the demo table). Rows whose teachers
(tags and weights), image size, seed, data and K agree share one bank, built for the most epochs any
of them trains: a 180-epoch run reads the first 180 epochs of a 200-epoch bank (the crop of image *i* in
epoch *e* depends only on ``(seed, e, i)``). A row trains online when a bank cannot hold its target
(CutMix mixes the batch before the teachers see it) or when it is the only student of its teachers and
the estimate says online is no slower (building a bank for one student repeats the teachers' work once;
it pays only when built on GPUs that would otherwise idle).

Stages are ordinary ``fastmeal`` commands (``data synth``, ``bank build``, ``train ... --resume auto``,
``eval``); the plan holds each one's argument list, the stages it waits for, its devices and estimate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastmeal.config import PRESETS, Config, ConfigError, build_config, parse_set_args
from fastmeal.console import format_duration
from fastmeal.table.rates import Rates, TableError, Workload, model_cost

PAPER_PRESETS = ("r50_224", "r50_224_cutmix", "r50_380", "r18_224", "mnv3s075_224", "mnv3s100_224",
                 "mnv3l100_224", "effb0_224")
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
MAX_RESTARTS = 3  # torchrun --max-restarts of every multi-GPU stage (a crashed rank restarts from --resume auto)
PLAN_FILE, STATE_FILE = "table_plan.json", "table_state.json"
PLACEHOLDER_ROOT = "/datasets/imagenet"  # shown in a plan without data.root (as in examples/)


def read_json(path: Path) -> dict[str, Any] | None:
    """A table file (plan, state, a stage's result) as JSON, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The demo table: the demo's synthetic data and tiny teachers, three students
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTable:
    """Sizes of the CPU demo table (``--demo``): a few minutes on a 2-core CPU.

    Two hard-label teachers as ``fastmeal demo`` trains them (:class:`fastmeal.demo.DemoSettings`), one bank
    shared by two students trained from scratch, and one online CutMix student.
    """

    num_classes: int = 10
    train_per_class: int = 30
    val_per_class: int = 100
    teacher_epochs: int = 40
    student_epochs: int = 20
    lr_steps: str = "15:0.005"
    students: tuple[tuple[str, str, bool], ...] = (("demo_bank_a", "test_efficientnet", False),
                                                   ("demo_bank_b", "test_resnet", False),
                                                   ("demo_cutmix", "test_efficientnet", True))


DEMO_TEACHERS = ("test_resnet", "test_byobnet")


@dataclass(frozen=True)
class TableSpec:
    """What the user asked for.

    Attributes:
        presets: rows to train (paper presets, or demo rows with ``demo``); empty = all of them.
        overrides: ``--set key=value`` items, applied to every stage's config.
        out: the table's folder (run dirs, banks, logs, state).
        demo: the CPU demo table instead of the paper's.
        nodes, gpus_per_node: the machine the estimate (and ``slurm``) is for; 0 GPUs = the CPU.
        gpus_per_stage: devices per stage (0 = every GPU of every node).
        demo_sizes: the demo table's sizes (tests shrink them).
    """

    presets: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    out: str = "table"
    demo: bool = False
    nodes: int = 1
    gpus_per_node: int = 0
    gpus_per_stage: int = 0
    demo_sizes: DemoTable = DemoTable()

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def stage_gpus(self) -> int:
        return self.gpus_per_stage or self.total_gpus


@dataclass
class Stage:
    """One command of the table.

    Attributes:
        name: unique, also the name of its log file and sbatch script.
        kind: ``data`` | ``teacher`` | ``bank`` | ``train`` | ``eval``.
        argv: the ``fastmeal`` arguments (after ``python -m fastmeal``).
        deps: stages that must finish first.
        gpus: devices it runs on (0 = the CPU, one process).
        output: what it produces (run dir, bank folder, result file).
        row: the row it trains or evaluates (None for shared stages).
        epochs: epochs it trains or builds (0 for data/eval).
        seconds: estimated wall-clock on its devices; ``rate_source``: ``measured`` or ``default``.
        gpu_hours: ``seconds × gpus / 3600`` (a CPU stage counts as one device).
        disk_bytes: estimated bytes it writes.
        result: for ``eval``, the file its JSON output goes to.
        work: rate keys it was estimated from.
    """

    name: str
    kind: str
    argv: list[str]
    deps: list[str]
    gpus: int
    output: str
    row: str | None = None
    epochs: int = 0
    seconds: float = 0.0
    rate_source: str = "default"
    gpu_hours: float = 0.0
    disk_bytes: int = 0
    result: str | None = None
    work: list[str] = field(default_factory=list)
    nodes: int = 1  # nodes it spans (gpus > gpus_per_node)
    start_s: float = 0.0  # in the estimated schedule
    end_s: float = 0.0

    def command(self) -> str:
        """The shell command of the stage (``$VARS`` of a multi-node rendezvous are the sbatch script's)."""
        return " ".join(w if w.startswith("$") else shlex.quote(w) for w in launcher(self.gpus, self.nodes)
                        + self.argv)


def launcher(gpus: int, nodes: int = 1) -> list[str]:
    """``torchrun ... -m fastmeal`` for several devices (c10d rendezvous over several nodes), ``python -m
    fastmeal`` for one device or none."""
    if gpus <= 1:
        return ["python", "-m", "fastmeal"]
    rdzv = (["--standalone", "--nproc-per-node", str(gpus)] if nodes == 1 else
            ["--nnodes", "$SLURM_NNODES", "--nproc-per-node", "$GPUS_PER_NODE", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT", "--rdzv-id", "$SLURM_JOB_ID"])
    return ["torchrun", *rdzv, "--max-restarts", str(MAX_RESTARTS), "-m", "fastmeal"]


@dataclass
class Row:
    """One student of the table and how it trains."""

    name: str
    preset: str
    cfg: Config
    sets: list[str]  # its --set items (user's first, then the table's)
    mode: str = "online"  # online | bank
    reason: str = ""
    bank: str | None = None


@dataclass
class Plan:
    spec: TableSpec
    rows: list[Row]
    stages: list[Stage]
    banks: list[dict[str, Any]]
    estimate: dict[str, Any]
    rates: Rates
    dataset: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def digest(self) -> str:
        """What a table folder must match to be continued: every stage's name, kind, command and deps."""
        ident = [(s.name, s.kind, s.argv, sorted(s.deps)) for s in self.stages]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"format": "fastmeal-table-plan", "digest": self.digest(), "out": self.spec.out,
                "demo": self.spec.demo, "nodes": self.spec.nodes, "gpus_per_node": self.spec.gpus_per_node,
                "gpus_per_stage": self.spec.stage_gpus, "overrides": list(self.spec.overrides),
                "dataset": self.dataset,
                "estimates_from": _source_label(self.rates), "rates_file": None if self.rates.source in (
                    "default", "calibrated") else self.rates.source, "warnings": self.warnings,
                "rows": [{"name": r.name, "preset": r.preset, "mode": r.mode, "bank": r.bank, "reason": r.reason,
                          "epochs": r.cfg.schedule.epochs, "run_dir": r.cfg.runtime.run_dir} for r in self.rows],
                "banks": self.banks,
                "stages": [{**asdict(s), "command": s.command()} for s in self.stages],
                "estimate": self.estimate}


def _source_label(rates: Rates) -> str:
    if rates.source == "default":
        return "default estimates (not measured; see README 'fastmeal table': estimates)"
    return f"measured rates ({rates.source}); default estimates where a stage has none"


# --------------------------------------------------------------------------------------------
# Rows and banks
# --------------------------------------------------------------------------------------------


def _check_presets(spec: TableSpec) -> tuple[str, ...]:
    valid = tuple(name for name, _, _ in spec.demo_sizes.students) if spec.demo else PAPER_PRESETS
    presets = spec.presets or valid
    unknown = [p for p in presets if p not in valid]
    if unknown:
        what = "demo table rows" if spec.demo else "paper presets"
        hint = "" if spec.demo or unknown[0] not in PRESETS else " (it is a preset, but not one of the paper's table)"
        raise TableError(f"unknown preset {unknown[0]!r}{hint}; the {what} are: {', '.join(valid)}")
    if len(set(presets)) != len(presets):
        raise TableError(f"--presets names a preset twice: {', '.join(presets)}")
    return tuple(presets)


def _paths(spec: TableSpec) -> dict[str, Path]:
    out = Path(spec.out)
    return {"runs": out / "runs", "banks": out / "banks", "eval": out / "eval", "logs": out / "logs",
            "data": out / "data"}


def _demo_rows(spec: TableSpec, presets: Sequence[str], user: list[str]) -> tuple[list[Row], list[Stage]]:
    """The demo table's shared stages (data, teachers) and its rows."""
    from fastmeal.demo import DemoSettings

    sizes, demo, paths = spec.demo_sizes, DemoSettings(), _paths(spec)
    data = str(paths["data"])
    common = [f"model.num_classes={sizes.num_classes}", f"data.root={data}"]
    synth = Stage(name="data", kind="data", gpus=0, output=data, deps=[], argv=[
        "data", "synth", data, "--classes", str(sizes.num_classes), "--train-per-class", str(sizes.train_per_class),
        "--val-per-class", str(sizes.val_per_class), "--seed", "0", "--no-progress"])
    stages = [synth]
    teacher_weights = []
    for i, tag in enumerate(DEMO_TEACHERS):
        run_dir = str(paths["runs"] / f"teacher{i}")
        # The user's overrides come after the demo's own settings (tests shrink the demo with them).
        sets = [*common, "loss.mode=ce", f"model.student={tag}", "model.pretrained=false",
                f"schedule.epochs={sizes.teacher_epochs}", f"optim.lr={demo.teacher_lr}",
                f"schedule.lr_steps={demo.teacher_lr_steps}", f"runtime.seed={i + 1}", *user,
                f"runtime.run_dir={run_dir}"]
        epochs = _config("demo", sets, f"teacher{i}").schedule.epochs
        stages.append(Stage(name=f"teacher{i}", kind="teacher", deps=["data"], gpus=spec.stage_gpus, output=run_dir,
                            epochs=epochs, argv=["train", "--preset", "demo", *_sets(sets),
                                                                  "--resume", "auto"]))
        teacher_weights.append(f"{tag}@{run_dir}/student_last.safetensors")
    rows = []
    for name, student, cutmix in sizes.students:
        if name not in presets:
            continue
        sets = [*common, f"model.student={student}", "model.pretrained=false",
                f"model.teachers={','.join(teacher_weights)}", f"schedule.epochs={sizes.student_epochs}",
                f"schedule.lr_steps={sizes.lr_steps}", *(["data.cutmix=true"] if cutmix else []), *user,
                f"runtime.run_dir={paths['runs'] / name}"]
        rows.append(Row(name=name, preset="demo", cfg=_config("demo", sets, name), sets=sets))
    return rows, stages


def _sets(items: Sequence[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _config(preset: str, sets: Sequence[str], row: str) -> Config:
    try:
        return build_config(preset, overrides=parse_set_args(sets))
    except ConfigError as err:
        raise TableError(f"{row}: {err}") from None


def _paper_rows(spec: TableSpec, presets: Sequence[str], user: list[str]) -> list[Row]:
    rows = []
    for preset in presets:
        sets = [*user, f"runtime.run_dir={_paths(spec)['runs'] / preset}"]
        rows.append(Row(name=preset, preset=preset, cfg=_config(preset, sets, preset), sets=sets))
    return rows


def _bank_key(cfg: Config) -> str:
    """Rows with the same key can share one bank (the fields a bank's manifest pins, plus where the data is)."""
    teachers = [(t.tag, t.weights) for t in cfg.model.teachers]
    return json.dumps([teachers, cfg.data.image_size, cfg.runtime.seed, cfg.data.root, cfg.model.num_classes,
                       cfg.bank.top_k])


def _bank_name(cfg: Config) -> str:
    tags = "+".join(t.tag.split(".")[0] for t in cfg.model.teachers)
    return f"bank-{tags}-{cfg.data.image_size}"


# --------------------------------------------------------------------------------------------
# The dataset (for estimates and disk)
# --------------------------------------------------------------------------------------------


def dataset_sizes(spec: TableSpec, root: str) -> dict[str, Any]:
    """Train and val image counts: the demo's, those under ``root`` when it exists, else ImageNet's."""
    if spec.demo:
        s = spec.demo_sizes
        return {"train": s.num_classes * s.train_per_class, "val": s.num_classes * s.val_per_class,
                "source": "the demo's synthetic dataset"}
    if root and (Path(root) / "train").is_dir():
        counts = {split: sum(1 for d in os.scandir(Path(root) / split) if d.is_dir()
                             for f in os.scandir(d.path) if f.is_file()) for split in ("train", "val")}
        return {**counts, "source": f"counted in {root}"}
    return {"train": IMAGENET_TRAIN, "val": IMAGENET_VAL, "source": "ImageNet-1k's sizes (data.root not readable here)"}


def check_data_root(root: str) -> None:
    """A data root must hold ``train/`` and ``val/`` (ImageFolder)."""
    if not root:
        raise TableError("no dataset: give --set data.root=DIR (an ImageFolder root with train/ and val/)")
    missing = [s for s in ("train", "val") if not (Path(root) / s).is_dir()]
    if missing:
        raise TableError(f"data.root={root} has no {' and no '.join(f'{m}/' for m in missing)} folder: give the "
                         "ImageFolder root that holds train/<class>/* and val/<class>/*")


def check_gpus_divide(rows: Sequence[Row], world: int, gpus_per_node: int) -> None:
    """Every preset's global batch must split evenly over a stage's ranks (as ``fastmeal train`` checks)."""
    if world <= 1:
        return
    for row in rows:
        for key in ("batch_size", "eval_batch_size"):
            batch = getattr(row.cfg.data, key)
            if batch and batch % world:
                limit = max(gpus_per_node, world)
                valid = [n for n in range(1, limit + 1) if batch % n == 0]
                below = max((n for n in valid if n < world), default=None)
                above = min((n for n in valid if n > world), default=None)
                near = " or ".join(str(n) for n in (below, above) if n is not None)
                raise TableError(f"--gpus-per-stage {world} does not divide {row.name}'s global batch "
                                 f"data.{key}={batch}: use {near} GPUs per stage (or set data.{key})")


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def build_plan(spec: TableSpec, rates: Rates, *, check_data: bool = False) -> Plan:
    """Rows, banks, stages with commands and estimates, and the schedule.

    Args:
        spec: what to plan.
        rates: the rates the estimates come from.
        check_data: refuse a ``data.root`` without ``train/`` and ``val/`` (``run``); ``plan`` and ``slurm``
            check it only when it is given.
    """
    presets = _check_presets(spec)
    if spec.nodes < 1 or spec.gpus_per_node < 0 or spec.gpus_per_stage < 0:
        raise TableError("--nodes must be >= 1, --gpus-per-node and --gpus-per-stage >= 0")
    if spec.gpus_per_stage > max(spec.total_gpus, 0) and spec.total_gpus:
        raise TableError(f"--gpus-per-stage {spec.gpus_per_stage} exceeds the {spec.total_gpus} GPUs of "
                         f"{spec.nodes} node(s) x {spec.gpus_per_node}")
    if spec.gpus_per_stage > spec.gpus_per_node and spec.gpus_per_stage % max(spec.gpus_per_node, 1):
        raise TableError(f"--gpus-per-stage {spec.gpus_per_stage} spans nodes: it must be a multiple of "
                         f"--gpus-per-node {spec.gpus_per_node}")
    user = list(spec.overrides)
    try:
        given_root = parse_set_args(user).get("data.root", "")
    except ConfigError as err:
        raise TableError(str(err)) from None
    warnings = list(rates.warnings)
    if not spec.demo and not given_root:
        if check_data:
            check_data_root("")
        user.append(f"data.root={PLACEHOLDER_ROOT}")
        warnings.append(f"data.root not given: the commands show data.root={PLACEHOLDER_ROOT} (add --set "
                        "data.root=DIR)")
    elif not spec.demo and not check_data and not Path(given_root).exists():
        warnings.append(f"data.root={given_root} does not exist on this machine: the estimates assume ImageNet's size")
    if spec.demo:
        rows, stages = _demo_rows(spec, presets, user)
    else:
        rows, stages = _paper_rows(spec, presets, user), []
    root = rows[0].cfg.data.root
    if not spec.demo and (check_data or Path(root).exists()):
        check_data_root(root)
    check_gpus_divide(rows, spec.stage_gpus, spec.gpus_per_node)
    dataset = dataset_sizes(spec, root)
    shared = [s.name for s in stages]

    banks = _choose_modes(spec, rows, rates, dataset)
    paths = _paths(spec)
    for bank in banks:
        first = next(r for r in rows if r.name == bank["rows"][0])
        sets = [s for s in first.sets if not s.startswith("runtime.run_dir=")]
        bank_dir = str(paths["banks"] / bank["name"])
        bank["path"] = bank_dir
        stage = Stage(name=bank["name"], kind="bank", deps=list(shared), gpus=spec.stage_gpus, output=bank_dir,
                      epochs=bank["epochs"], argv=["bank", "build", "--preset", first.preset, *_sets(sets),
                                                   "--out", bank_dir, "--epochs", f"0:{bank['epochs']}",
                                                   "--no-progress"])
        stages.append(stage)
    for row in rows:
        sets = list(row.sets)
        deps = list(shared)
        if row.mode == "bank":
            bank = next(b for b in banks if b["name"] == row.bank)
            sets.append(f"bank.path={bank['path']}")
            deps.append(row.bank)
            row.cfg = _config(row.preset, sets, row.name)
        row.sets = sets
        stages.append(Stage(name=f"train-{row.name}", kind="train", deps=deps, gpus=spec.stage_gpus, row=row.name,
                            output=row.cfg.runtime.run_dir, epochs=row.cfg.schedule.epochs,
                            argv=["train", "--preset", row.preset, *_sets(sets), "--resume", "auto"]))
        result = str(paths["eval"] / f"{row.name}.json")
        cfg = row.cfg
        eval_sets = [s for s in sets if s.split("=")[0] in ("model.num_classes", "model.student_weights")
                     or s.split("=")[0].startswith(("precision.", "data.workers", "data.backend"))
                     or s.split("=")[0] == "runtime.device"]
        stages.append(Stage(name=f"eval-{row.name}", kind="eval", deps=[f"train-{row.name}"],
                            gpus=min(spec.stage_gpus, 1), row=row.name, output=result, result=result,
                            argv=["eval", "--preset", row.preset, *_sets(eval_sets), "--model", cfg.model.student,
                                  "--weights", f"{cfg.runtime.run_dir}/student_best.safetensors", "--data",
                                  cfg.data.root, "--res", str(cfg.data.image_size), "--resize",
                                  str(cfg.data.resolved_eval_resize), "--json", "--no-progress"]))
    for stage in stages:
        stage.nodes = math.ceil(stage.gpus / spec.gpus_per_node) if stage.gpus and spec.gpus_per_node else 1
    plan = Plan(spec=spec, rows=rows, stages=stages, banks=banks, estimate={}, rates=rates, dataset=dataset,
                warnings=warnings)
    estimate_stages(plan)
    return plan


def _choose_modes(spec: TableSpec, rows: list[Row], rates: Rates, dataset: dict[str, Any]) -> list[dict[str, Any]]:
    """Group rows by teachers; decide bank or online per row, with the reason."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.cfg.data.cutmix:
            row.mode, row.reason = "online", ("CutMix mixes a batch before the teachers see it: a per-image "
                                              "record cannot hold the mixed image's target")
            continue
        groups.setdefault(_bank_key(row.cfg), []).append(row)
    banks = []
    for members in groups.values():
        cfg = members[0].cfg
        epochs = max(r.cfg.schedule.epochs for r in members)
        if cfg.bank.top_k > cfg.model.num_classes:
            raise TableError(f"bank.top_k={cfg.bank.top_k} exceeds model.num_classes={cfg.model.num_classes} of "
                             f"{members[0].name}: set bank.top_k <= {cfg.model.num_classes}")
        name = _bank_name(cfg)
        if len(members) == 1:
            row = members[0]
            online = _train_seconds(row.cfg, "online", rates, dataset, spec.stage_gpus)[0]
            build = _bank_seconds(cfg, epochs, rates, dataset, spec.stage_gpus)[0]
            from_bank = _train_seconds(row.cfg, "student", rates, dataset, spec.stage_gpus)[0]
            if online <= build + from_bank:
                row.mode = "online"
                row.reason = (f"its teachers serve no other student: online {format_duration(online)} vs bank "
                              f"{format_duration(build + from_bank)} (build {format_duration(build)} + train "
                              f"{format_duration(from_bank)}) by the estimate; a bank would pay only if built on "
                              "GPUs that would otherwise idle")
                continue
            row.reason = (f"its teachers serve no other student, but the bank is faster by the estimate: "
                          f"{format_duration(build + from_bank)} vs {format_duration(online)} online")
        else:
            for row in members:
                row.reason = f"shares the bank with {len(members) - 1} other student(s)"
        for row in members:
            row.mode, row.bank = "bank", name
            if row.cfg.schedule.epochs < epochs:
                row.reason += f"; reads the first {row.cfg.schedule.epochs} of its {epochs} epochs"
        banks.append({"name": name, "teachers": [t.tag for t in cfg.model.teachers],
                      "teacher_weights": [t.weights for t in cfg.model.teachers], "image_size": cfg.data.image_size,
                      "seed": cfg.runtime.seed, "epochs": epochs, "top_k": cfg.bank.top_k,
                      "rows": [r.name for r in members]})
    return banks


# --------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------


def _batch(cfg: Config, gpus: int) -> int:
    return max(1, cfg.data.batch_size // max(gpus, 1))


def _work(cfg: Config, kind: str, gpus: int) -> Workload:
    teachers = tuple(t.tag for t in cfg.model.teachers) if kind in ("online", "teachers") else ()
    model = "" if kind == "teachers" else cfg.model.student
    return Workload(kind=kind, model=model, teachers=teachers, image_size=cfg.data.image_size,
                    num_classes=cfg.model.num_classes, batch=_batch(cfg, gpus))


def _train_seconds(cfg: Config, kind: str, rates: Rates, dataset: dict[str, Any],
                   gpus: int) -> tuple[float, bool, list[str]]:
    """Estimated wall-clock of a training run: every epoch's steps and its evaluation, plus the start-up."""
    devices = max(gpus, 1)
    train, t_src = rates.rate(_work(cfg, kind, gpus))
    val, v_src = rates.rate(_work(cfg, "eval", gpus))
    start, s_src = rates.rate(Workload(kind="startup"))
    steps = cfg.runtime.max_steps_per_epoch
    images = min(dataset["train"], steps * cfg.data.batch_size) if steps else dataset["train"]
    per_epoch = images / (train * devices) + dataset["val"] / (val * devices)
    measured = all(s == "measured" for s in (t_src, v_src, s_src))
    return start + cfg.schedule.epochs * per_epoch, measured, [_work(cfg, kind, gpus).key, _work(cfg, "eval",
                                                                                              gpus).key, "startup"]


def _bank_seconds(cfg: Config, epochs: int, rates: Rates, dataset: dict[str, Any],
                  gpus: int) -> tuple[float, bool, list[str]]:
    rate, r_src = rates.rate(_work(cfg, "teachers", gpus))
    start, s_src = rates.rate(Workload(kind="startup"))
    return (start + epochs * dataset["train"] / (rate * max(gpus, 1)), r_src == s_src == "measured",
            [_work(cfg, "teachers", gpus).key, "startup"])


def plan_workloads(plan: Plan) -> list[Workload]:
    """Every distinct workload of the plan's stages (what ``--calibrate`` times), online alternatives included."""
    works = [Workload(kind="startup")]
    gpus = plan.spec.stage_gpus
    if plan.spec.demo:
        works.append(Workload(kind="synth"))
    for stage in plan.stages:
        if stage.kind == "teacher":
            cfg = _config("demo", _set_items(stage.argv), stage.name)
            works += [_work(cfg, "student", gpus), _work(cfg, "eval", gpus)]
    for row in plan.rows:
        works += [_work(row.cfg, "online", gpus), _work(row.cfg, "eval", gpus)]
        if row.mode == "bank" or not row.cfg.data.cutmix:
            works += [_work(row.cfg, "student", gpus), _work(row.cfg, "teachers", gpus)]
    return list({w.key: w for w in works}.values())


def _set_items(argv: Sequence[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]


def _stage_cfg(plan: Plan, stage: Stage) -> Config:
    preset = stage.argv[stage.argv.index("--preset") + 1]
    return _config(preset, _set_items(stage.argv), stage.name)


def estimate_stages(plan: Plan) -> None:
    """Each stage's seconds, GPU-hours and disk; the schedule of the table and of the same table online."""
    rates, dataset, spec = plan.rates, plan.dataset, plan.spec
    for stage in plan.stages:
        if stage.kind == "data":
            rate, src = rates.rate(Workload(kind="synth"))
            start, s_src = rates.rate(Workload(kind="startup"))
            stage.seconds, measured = start + (dataset["train"] + dataset["val"]) / rate, src == s_src == "measured"
            stage.work = ["synth", "startup"]
            stage.disk_bytes = (dataset["train"] + dataset["val"]) * 4096  # the demo's JPEGs: ~3-4 KB each
        elif stage.kind == "bank":
            cfg = _stage_cfg(plan, stage)
            stage.seconds, measured, stage.work = _bank_seconds(cfg, stage.epochs, rates, dataset, stage.gpus)
            from fastmeal.bank.store import record_dtype

            stage.disk_bytes = dataset["train"] * record_dtype(cfg.bank.top_k).itemsize * stage.epochs
        elif stage.kind in ("train", "teacher"):
            cfg = _stage_cfg(plan, stage)
            kind = "student" if cfg.bank.path or cfg.loss.mode == "ce" else "online"
            stage.seconds, measured, stage.work = _train_seconds(cfg, kind, rates, dataset, stage.gpus)
            stage.disk_bytes = checkpoint_bytes(cfg)
        else:  # eval
            cfg = _stage_cfg(plan, stage)
            val, v_src = rates.rate(_work(cfg, "eval", stage.gpus))
            start, s_src = rates.rate(Workload(kind="startup"))
            stage.seconds, measured = start + dataset["val"] / (val * max(stage.gpus, 1)), v_src == s_src == "measured"
            stage.work = [_work(cfg, "eval", stage.gpus).key, "startup"]
        stage.rate_source = "measured" if measured else "default"
        stage.gpu_hours = stage.seconds * max(stage.gpus, 1) / 3600
    wall = simulate(plan.stages, spec)
    # The same table with every row online: no bank stage, each row's training at the online rate.
    online_stages = []
    for stage in plan.stages:
        if stage.kind == "bank":
            continue
        copy = Stage(**{**asdict(stage), "deps": [d for d in stage.deps if not d.startswith("bank-")]})
        if stage.kind == "train":
            cfg = _stage_cfg(plan, stage)
            copy.seconds = _train_seconds(cfg, "online", rates, dataset, stage.gpus)[0]
            copy.gpu_hours = copy.seconds * max(stage.gpus, 1) / 3600
        online_stages.append(copy)
    online_wall = simulate(online_stages, spec)
    gpu_hours = sum(s.gpu_hours for s in plan.stages)
    online_hours = sum(s.gpu_hours for s in online_stages)
    plan.estimate = {
        "source": _source_label(rates),
        "all_measured": all(s.rate_source == "measured" for s in plan.stages),
        "gpu_hours": gpu_hours, "wall_seconds": wall,
        "online_gpu_hours": online_hours, "online_wall_seconds": online_wall,
        "saved_gpu_hours": online_hours - gpu_hours,
        "disk_bytes": {"banks": sum(s.disk_bytes for s in plan.stages if s.kind == "bank"),
                       "checkpoints": sum(s.disk_bytes for s in plan.stages if s.kind in ("train", "teacher")),
                       "data": sum(s.disk_bytes for s in plan.stages if s.kind == "data")},
        "machine": f"{spec.nodes} node(s) x {spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else "this CPU",
        "uncovered": rates.uncovered(plan_workloads(plan)) if rates.source != "default" else [],
    }


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes a run dir holds at most: ``keep_last`` checkpoints and ``best.pt`` (weights, momentum and the
    discriminator's, fp32), and four student exports (last and best, ``.safetensors`` and ``.pth``)."""
    params = model_cost(cfg.model.student, 32, cfg.model.num_classes)[1]  # the parameter count is size-independent
    return 4 * params * (2 * (cfg.runtime.keep_last + 1) + 4)


def priorities(stages: Sequence[Stage]) -> dict[str, float]:
    """Each stage's longest estimated path to the end of the table, itself included (critical path first)."""
    by_name = {s.name: s for s in stages}
    after: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for d in s.deps:
            after[d].append(s.name)
    memo: dict[str, float] = {}

    def longest(name: str) -> float:
        if name not in memo:
            memo[name] = by_name[name].seconds + max((longest(n) for n in after[name]), default=0.0)
        return memo[name]

    return {s.name: longest(s.name) for s in stages}


def device_units(stage: Stage, spec: TableSpec) -> int:
    """Devices a stage holds in the schedule: its GPUs; on a machine without GPUs every stage holds the CPU."""
    return stage.gpus if spec.total_gpus else 1


def simulate(stages: list[Stage], spec: TableSpec) -> float:
    """List-schedule the stages on the machine (critical path first); sets ``start_s``/``end_s``; returns the end."""
    prio = priorities(stages)
    capacity = spec.total_gpus or 1
    pending = sorted(stages, key=lambda s: -prio[s.name])
    done: dict[str, float] = {}
    running: list[Stage] = []
    now, free = 0.0, capacity
    while pending or running:
        for stage in list(pending):
            units = device_units(stage, spec)
            if all(d in done for d in stage.deps) and units <= free:
                stage.start_s, stage.end_s = now, now + stage.seconds
                free -= units
                running.append(stage)
                pending.remove(stage)
        if not running:
            raise TableError("the plan's stages cannot be scheduled (a dependency cycle, or a stage needs more "
                             "GPUs than the machine has)")
        running.sort(key=lambda s: s.end_s)
        first = running.pop(0)
        now = first.end_s
        done[first.name] = now
        free += device_units(first, spec)
    return max(done.values(), default=0.0)


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_plan(plan: Plan) -> str:
    """The plan as text: banks, rows and why, stages with commands and estimates, totals, disk."""
    spec, est = plan.spec, plan.estimate
    if est["all_measured"]:
        label = "estimate from measured rates"
    elif plan.rates.source == "default":
        label = "ESTIMATE from DEFAULT rates (not measured)"
    else:
        label = "estimate: measured rates where available, DEFAULT rates (not measured) for the rest"
    devices = f"{spec.stage_gpus} GPU(s) per stage" if spec.total_gpus else "one stage at a time on the CPU"
    unit = "GPU" if spec.total_gpus else "CPU"  # a CPU stage counts as one device
    lines = [f"fastmeal table plan: {'demo table' if spec.demo else 'paper table'}, {len(plan.rows)} row(s), "
             f"{est['machine']}, {devices}; out {spec.out}",
             f"dataset: {plan.dataset['train']:,} train / {plan.dataset['val']:,} val images "
             f"({plan.dataset['source']})", f"estimates: {est['source']}"]
    lines += [f"warning: {w}" for w in plan.warnings]
    if est["uncovered"]:
        lines.append(f"warning: no measured rate for {', '.join(est['uncovered'])}: default estimates used there")
    lines += ["", "Banks:"]
    for bank in plan.banks:
        lines.append(f"  {bank['name']}: {' + '.join(bank['teachers'])} at {bank['image_size']} px, seed "
                     f"{bank['seed']}, {bank['epochs']} epochs, K={bank['top_k']} -> serves {', '.join(bank['rows'])}")
    if not plan.banks:
        lines.append("  (none)")
    lines += ["", "Rows:"]
    width = max(len(r.name) for r in plan.rows)
    for row in plan.rows:
        how = f"from {row.bank}" if row.mode == "bank" else "online"
        lines.append(f"  {row.name:<{width}}  {row.cfg.schedule.epochs:>3} epochs  {how}: {row.reason}")
    lines += ["", f"Stages (in start order of the estimated schedule; each {label.lower()}):"]
    for i, stage in enumerate(sorted(plan.stages, key=lambda s: (s.start_s, s.name)), 1):
        after = ", ".join(stage.deps) or "-"
        gpus = f"{stage.gpus} GPU" if stage.gpus else "CPU"
        lines.append(f"  {i:>2}. {stage.name}  [{stage.kind}; after: {after}; {gpus}; est. "
                     f"{format_duration(stage.seconds)} wall, {stage.gpu_hours:.2f} {unit}-h ({stage.rate_source}); "
                     f"starts at {format_duration(stage.start_s)}]")
        lines.append(f"      {stage.command()}")
    disk = est["disk_bytes"]
    share = f" ({100 * est['saved_gpu_hours'] / est['online_gpu_hours']:.0f}%)" if est["online_gpu_hours"] else ""
    lines += ["", f"Total ({label}): {est['gpu_hours']:.2f} {unit}-hours, wall-clock "
              f"{format_duration(est['wall_seconds'])} on {est['machine']}",
              f"Same table all online ({label}): {est['online_gpu_hours']:.2f} {unit}-hours, wall-clock "
              f"{format_duration(est['online_wall_seconds'])}; the banks save {est['saved_gpu_hours']:.2f} {unit}-hours"
              + share,
              f"Disk (estimate): banks {_gb(disk['banks'])}, checkpoints and exports {_gb(disk['checkpoints'])}"
              + (f", data {_gb(disk['data'])}" if disk["data"] else "")
              + f"; {_gb(sum(disk.values()))} in {spec.out} (checked against the free space before `run`)"]
    return "\n".join(lines)

