"""The ``fastmeal`` command: parse → build the config → call one function per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from fastmeal import lifecycle
from fastmeal.config import PRESETS, ConfigError, RuntimeConfig, build_config, parse_set_args, to_toml
from fastmeal.registry import BACKENDS


def _add_config_args(parser: argparse.ArgumentParser, default_preset: str = "r50_224") -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"paper configuration to start from (default {default_preset})")
    parser.add_argument("--config", dest="config_file", metavar="FILE",
                        help="TOML/YAML/JSON file of overrides, e.g. [optim] lr = 0.02")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted-key override, repeatable: --set optim.lr=0.02 --set data.root=/imagenet")


def config_from_args(args: argparse.Namespace, **extra: str):
    overrides = parse_set_args(args.overrides)
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return build_config(args.preset, config_file=args.config_file, overrides=overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.json:
        print(cfg.to_json())
        return 0
    print(f"# preset {args.preset} (resolved); valid TOML: save it and pass it back with --config FILE.toml")
    print(to_toml(cfg), end="")
    print(f"# lr regime: epoch 0: {cfg.lr_at(0)}"
          + "".join(f", epoch {e}: {lr}" for e, lr in cfg.schedule.lr_steps)
          + f"; eval: resize {cfg.data.resolved_eval_resize} -> crop {cfg.data.image_size}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fastmeal.data.synthetic import synthesize

    summary = synthesize(args.out, num_classes=args.classes, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, seed=args.seed, size_range=tuple(args.size_range),
                         oddities=args.oddities, progress=not args.no_progress, num_workers=args.workers,
                         force=args.force)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from fastmeal.data.check import check_dataset, format_report

    report = check_dataset(args.dir, progress=not args.no_progress, num_workers=args.workers)
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_data_imagenet_val(args: argparse.Namespace) -> int:
    from fastmeal.data.imagenet import arrange_val, labels_from_devkit, labels_from_solution

    _setup_logging()
    labels = labels_from_devkit(args.devkit) if args.devkit else labels_from_solution(args.solution)
    summary = arrange_val(args.flat, args.out, labels, move=args.move, per_class=args.per_class or None,
                          progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of each record (not the one of
    the first call): ``main`` may run several times in one process (tests, notebooks)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def _setup_logging() -> None:
    """INFO lines from rank 0, warnings only from the other ranks (STYLE: one rank-0 logger)."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logger = logging.getLogger("fastmeal")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "fix your input" (their message says how): reported without a traceback."""
    from fastmeal.checkpoint import CheckpointError
    from fastmeal.data.common import DataError
    from fastmeal.errors import SetupError
    from fastmeal.models.factory import WeightsError
    from fastmeal.rundir import RunDirError

    return CheckpointError, DataError, WeightsError, SetupError, RunDirError


def _failures() -> tuple[type[Exception], ...]:
    """Errors of a run that went wrong (not of the input): one line, exit 1; their message says what happened."""
    from fastmeal.checkpoint import DiskFullError
    from fastmeal.errors import NonFiniteError, OutOfMemoryError
    from fastmeal.rundir import RunDirVanishedError

    return DiskFullError, NonFiniteError, OutOfMemoryError, RunDirVanishedError


# What to do about an OSError on a path: the user's environment (read-only or full disk, permissions, a name
# too long, a file where a folder is needed), never a bug of fastmeal's (issue #23).
_PATH_ADVICE = {
    errno.EROFS: "the file system is read-only: choose an output folder on a writable disk",
    errno.EACCES: "permission denied: choose a folder you can write (or read), or fix its permissions",
    errno.EPERM: "operation not permitted: choose another folder, or fix its permissions",
    errno.ENAMETOOLONG: "the name is longer than the file system allows: choose a shorter name",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file is needed: name a file",
    errno.EEXIST: "it exists already (a file where a folder is needed?): choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ELOOP: "too many levels of symbolic links (a link loop?): fix or remove the link",
}


def _path_error(err: OSError) -> str:
    """One line for an OSError on a path: the path, the system's reason, what to do."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    advice = _PATH_ADVICE.get(err.errno, "check the path and the disk")
    return f"{paths}: {err.strerror or err}; {advice}"


def _report_user_error(err: Exception | str) -> int:
    print(f"fastmeal: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_train(args: argparse.Namespace) -> int:
    from fastmeal.config import parse_allowed_changes
    from fastmeal.metrics import finite_json
    from fastmeal.run import train

    cfg = config_from_args(args, **{"runtime.resume": args.resume})
    _setup_logging()
    summary = train(cfg, allow_changed=parse_allowed_changes(args.allow_changed))
    # Every rank prints its own summary (torchrun keeps ranks' streams apart): a rank's summary says
    # why it stopped ("preempted by SIGUSR1" on the signalled rank, "by peer" on the others).
    print(json.dumps(finite_json(summary), indent=2, default=str, allow_nan=False))
    return 0


def cmd_bank_build(args: argparse.Namespace) -> int:
    from fastmeal.bank.build import build_bank, parse_epochs
    from fastmeal.distributed import shutdown

    cfg = config_from_args(args, **{"bank.top_k": args.top_k})
    _setup_logging()
    try:
        summary = build_bank(cfg, args.out, epochs=parse_epochs(args.epochs, cfg.schedule.epochs),
                             top_k=cfg.bank.top_k, chunk_records=cfg.bank.chunk_records, progress=not args.no_progress)
    except _user_errors() as err:
        return _report_user_error(err)
    finally:
        shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))
    return 0


# The config keys `fastmeal eval`'s flags set (each flag's value is the argument of that name): its errors name
# the flag the user typed, not the key.
_EVAL_FLAGS = {"model.student_weights": "--weights", "model.student": "--model", "data.root": "--data",
               "data.image_size": "--res", "data.eval_resize": "--resize", "data.eval_batch_size": "--batch-size",
               "data.workers": "--workers", "data.backend": "--backend", "runtime.device": "--device",
               "precision.mode": "--precision"}


def _in_eval_flags(err: Exception) -> Exception:
    """``err`` with each config key of an eval flag written as that flag (``data.root='x'`` → ``--data 'x'``)."""
    import re

    text = str(err)
    for key, flag in _EVAL_FLAGS.items():
        text = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.])(=?)", lambda m, f=flag: f + (" " if m[1] else ""), text)
    try:
        return type(err)(text)
    except TypeError:  # an exception type that does not take one message: keep it as it was
        return err


def cmd_eval(args: argparse.Namespace) -> int:
    from fastmeal.evaluate import evaluate_config
    from fastmeal.metrics import finite_json

    extra = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in _EVAL_FLAGS.items()}
    try:
        cfg = config_from_args(args, **{k: str(v) for k, v in extra.items() if v is not None})
        _setup_logging()
        result = evaluate_config(cfg, progress=not args.no_progress)
    except (ConfigError, *_user_errors()) as err:
        raise _in_eval_flags(err) from err
    if args.json:
        print(json.dumps(finite_json(result), indent=2, allow_nan=False))
    else:
        print(f"{result['model']} ({result['weights']}) at {result['image_size']} px (resize {result['eval_resize']}):"
              f" top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"[{result['count']} images, {result['images_per_s']:.1f} img/s on {result['device']}]")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo runs on the CPU, where loader workers and torch's OpenMP threads share the cores.
    # Spinning OpenMP threads then starve each other (measured on a busy 2-core machine: a BatchNorm
    # forward 0.6 ms passive vs 20-60 ms spinning, resnet10t training 2-3x slower). Must be set
    # before torch is imported, which is why it is here and not in fastmeal.demo.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fastmeal.demo import run_demo

    _setup_logging()
    run_demo(args.out, seed=args.seed, progress=not args.no_progress)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fastmeal.report import ReportError, write_report

    _setup_logging()
    try:
        report = write_report(args.run_dirs, args.out)
    except ReportError as err:
        return _report_user_error(err)
    for run in report.runs:
        print(f"{run.name}: {next(r for r in report.rows if r['run'] == run.name)['status']}")
    print(f"report written to {report.html} (figures: {', '.join(p.name for p in report.figures.values())}; "
          f"summary: {report.markdown.name})")
    return 0


def _needed_weights(cfg):
    """Every weights file a training run of ``cfg`` loads: the student's, and the teachers' unless it needs none."""
    from fastmeal.models.factory import weight_sources
    from fastmeal.objectives import needs_teachers

    return weight_sources(cfg, teachers=needs_teachers(cfg))


def cmd_weights_list(args: argparse.Namespace) -> int:
    from fastmeal.models.factory import HF_FILENAMES

    cfg = config_from_args(args)
    sources = _needed_weights(cfg)
    for s in sources:
        here = f"found {s.found} ({os.path.getsize(s.found) / 1e6:.1f} MB)" if s.found else "MISSING"
        hub = f"hf {s.hf_repo} {'|'.join(HF_FILENAMES)}" if s.hf_repo and not s.file else s.origin()
        print(f"{s.key:<18} {s.tag:<32} {hub}  {here}")
    missing = sum(not s.found for s in sources)
    print(f"# {len(sources)} file(s), {missing} missing here" + (
        f"; fetch them on a machine with network access: fastmeal weights fetch --preset {args.preset} --out DIR "
        "(same --set options), then HF_HUB_CACHE=DIR here" if missing else ""))
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from fastmeal.models.factory import fetch_weights

    cfg = config_from_args(args)
    sources = _needed_weights(cfg)
    for source, path in fetch_weights(sources, args.out):
        print(f"{source.key:<18} {source.tag:<32} {path} ({path.stat().st_size / 1e6:.1f} MB)")
    for source in sources:
        if source.file:
            print(f"{source.key:<18} {source.tag:<32} names the local file {source.file}: copy it yourself")
    print(f"# on the offline machine: copy {args.out} there, then export HF_HUB_CACHE={args.out} HF_HUB_OFFLINE=1")
    return 0
# ---------------------------------------------------------------------------------------- fastmeal table


def _table_spec(args: argparse.Namespace):
    from fastmeal.table.plan import TableSpec

    presets = tuple(p for item in args.presets for p in item.split(",") if p)
    gpus = args.gpus_per_node
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return TableSpec(presets=presets, overrides=tuple(args.overrides), out=args.out, demo=args.demo,
                     nodes=args.nodes, gpus_per_node=gpus, gpus_per_stage=args.gpus_per_stage)


def _table_plan(args: argparse.Namespace, *, check_data: bool = False):
    """The plan of the table the arguments describe, its rates calibrated, read or defaulted (printing why)."""
    from fastmeal.table.plan import build_plan, plan_workloads
    from fastmeal.table.rates import Rates, calibrate, machine_identity, read_rates, write_rates

    spec = _table_spec(args)
    if spec.total_gpus and check_data:
        import torch

        if spec.gpus_per_node > torch.cuda.device_count() or spec.nodes != 1:
            from fastmeal.table.plan import TableError

            raise TableError(f"`table run` runs on this node, which has {torch.cuda.device_count()} GPU(s): use "
                             f"--nodes 1 and --gpus-per-node <= {torch.cuda.device_count()} (`table slurm` for "
                             "several nodes)")
    here = machine_identity() if (args.rates or getattr(args, "calibrate", False)) else None
    rates = read_rates(args.rates, here=here) if args.rates and not getattr(args, "calibrate", False) else Rates(
        device_kind="gpu" if spec.total_gpus else "cpu")
    plan = build_plan(spec, rates, check_data=check_data)
    if getattr(args, "calibrate", False):
        measured = calibrate(plan_workloads(plan), steps=args.calibrate_steps)
        path = write_rates(args.rates or f"{spec.out}/table_rates.json", measured, here, {
            "steps": args.calibrate_steps, "table": "demo" if spec.demo else "paper",
            "what": "images/s per device of each workload's compute on random tensors (randomly initialised timm "
                    "models, the stage's per-device batch); startup: seconds to import fastmeal's training modules"})
        print(f"rates written to {path}", file=sys.stderr)
        plan = build_plan(spec, read_rates(path, here=here), check_data=check_data)
    return plan


def cmd_table(args: argparse.Namespace) -> int:
    """``fastmeal table plan|run|slurm|report``: bad input is one line and exit 2, before anything starts."""
    if getattr(args, "calibrate", False):
        # Before torch's import, as `fastmeal demo` does: on a CPU, spinning OpenMP threads starve each other and
        # the timings would be several times slower than the stages (which the runner starts with it too).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fastmeal.report import ReportError
    from fastmeal.table.plan import TableError

    _setup_logging()
    try:
        if args.verb == "report":
            from fastmeal.table.report import write_table_report

            report = write_table_report(args.out)
            print(f"table report written to {report['markdown']} and {report['html']} (figure {report['figure']})")
            return 0
        plan = _table_plan(args, check_data=args.verb == "run")
        if args.verb == "plan":
            from fastmeal.table.plan import format_plan

            print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
            return 0
        if args.verb == "slurm":
            from fastmeal.table.slurm import write_slurm

            for line in write_slurm(plan, args.slurm_dir or f"{args.out}/slurm"):
                print(line)
            return 0
        from fastmeal.table.runner import run_table

        return run_table(plan, replan=args.replan, status_every=args.status_every)
    except (TableError, ReportError) as err:
        return _report_user_error(err)


def _add_table_parser(sub: argparse._SubParsersAction) -> None:
    table = sub.add_parser("table", help="the paper's table in one command: plan, run (resumable), slurm, report")
    verbs = table.add_subparsers(dest="verb", required=True)
    helps = {"plan": "banks, which preset trains how and why, every stage's command, estimates, disk",
             "run": "run the plan's stages on this node into --out (the same command continues a stopped table)",
             "slurm": "write one sbatch script per stage, chained by afterok dependencies, and submit.sh",
             "report": "the table beside the paper's numbers: table.md, table.html, table.png in OUT/report"}
    for verb, text in helps.items():
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--out", default="table_out", metavar="DIR", help="the table's folder (default table_out)")
        if verb == "report":
            continue
        p.add_argument("--presets", action="append", default=[], metavar="A,B",
                       help="rows to train (default: the eight paper presets; with --demo the demo's rows)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override for every stage, e.g. --set data.root=/datasets/imagenet")
        p.add_argument("--demo", action="store_true", help="the CPU demo table: synthetic data, two tiny teachers")
        p.add_argument("--nodes", type=int, default=1, help="nodes (estimates, slurm; run uses this node)")
        p.add_argument("--gpus-per-node", type=int, metavar="N", help="default: this machine's GPUs (0: the CPU)")
        p.add_argument("--gpus-per-stage", type=int, default=0, metavar="G",
                       help="devices per stage (default: all); smaller runs independent stages side by side")
        p.add_argument("--rates", metavar="FILE", help="measured rates (from --calibrate) for the estimates")
        if verb == "plan":
            p.add_argument("--calibrate", action="store_true",
                           help="time each distinct stage here first; writes --rates FILE or OUT/table_rates.json")
            p.add_argument("--calibrate-steps", type=int, default=24, metavar="N", help="timed steps per workload")
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
        if verb == "run":
            p.add_argument("--replan", action="store_true",
                           help="OUT holds another plan: switch to this one, keeping finished stages that still fit")
            p.add_argument("--status-every", type=float, default=60.0, metavar="S", help="seconds between status lines")
        if verb == "slurm":
            p.add_argument("--slurm-dir", metavar="DIR", help="where the scripts go (default OUT/slurm)")
        p.set_defaults(func=cmd_table, on_interrupt="the running stages checkpointed: run the same fastmeal table "
                       "command to continue")
    verbs.choices["report"].set_defaults(func=cmd_table)


def cmd_probe(args: argparse.Namespace) -> int:
    from fastmeal.distributed import init_distributed, shutdown
    from fastmeal.models.backbone import build_backbone
    from fastmeal.probe import run_probe

    _setup_logging()
    info = init_distributed(args.device, timeout_s=RuntimeConfig.dist_timeout_s)
    try:
        backbone = build_backbone(args.model, weights=args.weights, random_init=args.random_init)
        result = run_probe(backbone, args.data, args.out, realms=args.realms.split(",") if args.realms else None,
                           res=args.res, cache_dir=args.cache, batch_size=args.batch_size, workers=args.workers,
                           device=info.device, rank=info.rank, world_size=info.world_size,
                           num_steps=args.steps, eval_every=args.eval_every,
                           batched={"auto": None, "batched": True, "per-lambda": False}[args.solver],
                           progress=not args.no_progress)
    finally:
        shutdown()
    if info.is_main:
        print(Path(args.out, "probe.md").read_text(), end="")
        paper = f" (paper: {result['paper']:.1f})" if result["paper"] is not None else ""
        print(f"average top-1 over {len(result['realms'])} realm(s): clean {result['mean_top1_clean']:.2f}%, "
              f"omnibench {result['mean_top1_omnibench']:.2f}%{paper}; written to {args.out}/probe.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmeal", description="Fast, faithful MEAL V2 distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="show the resolved configuration").add_subparsers(dest="action",
                                                                                            required=True)
    show = config.add_parser("show", help="print the resolved config of a preset with overrides")
    _add_config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON (round-trips to the same config)")
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="generate or check an ImageFolder JPEG dataset").add_subparsers(
        dest="action", required=True)
    synth = data.add_parser("synth", help="write a deterministic synthetic JPEG dataset (ImageFolder layout)")
    synth.add_argument("out", help="output folder (train/ and val/ are created in it)")
    synth.add_argument("--classes", type=int, default=10, help="number of classes, >= 2 (default 10)")
    synth.add_argument("--train-per-class", type=int, default=100, help="train images per class (default 100)")
    synth.add_argument("--val-per-class", type=int, default=20, help="val images per class (default 20)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files (default 0)")
    synth.add_argument("--size-range", type=int, nargs=2, default=(64, 112), metavar=("LO", "HI"),
                       help="short side in pixels (ImageNet-like: 375 500)")
    synth.add_argument("--oddities", action="store_true",
                       help="add grayscale, CMYK, progressive JPEGs and a PNG named .JPEG, as ImageNet has")
    synth.add_argument("--workers", type=int, default=1, help="processes (the files do not depend on it)")
    synth.add_argument("--force", action="store_true", help="write into a non-empty folder: replaces a dataset data "
                       "synth wrote there (only its own files are deleted); other data is never touched")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=cmd_data_synth)
    check = data.add_parser("check", help="count images and list every problem by path (exit 1 on problems)")
    check.add_argument("dir", help="dataset root holding train/<class>/* and/or val/<class>/*")
    check.add_argument("--workers", type=int, default=1, help="processes decoding files in parallel")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=cmd_data_check)

    inval = data.add_parser("imagenet-val", help="arrange ImageNet's flat val folder into class folders "
                            "(val/<wnid>/*.JPEG) from the devkit or LOC_val_solution.csv, and check 50 per class")
    inval.add_argument("flat", help="the folder ILSVRC2012_img_val.tar was unpacked into")
    inval.add_argument("--out", required=True, metavar="VAL_DIR", help="the val split to write, e.g. "
                       "/data/imagenet/val (new or empty; a stopped run continues)")
    labels = inval.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", metavar="DIR", help="the extracted ILSVRC2012_devkit_t12 folder (needs SciPy)")
    labels.add_argument("--solution", metavar="CSV", help="Kaggle's LOC_val_solution.csv")
    inval.add_argument("--move", action="store_true", help="move the files (default: symbolic links to them)")
    inval.add_argument("--per-class", type=int, default=50, help="images every class must have (default 50; 0: "
                       "no check)")
    inval.add_argument("--no-progress", action="store_true", help="no progress bar")
    inval.set_defaults(func=cmd_data_imagenet_val)

    train = sub.add_parser("train", help="train (MEAL V2 distillation, or hard labels with loss.mode=ce)")
    _add_config_args(train)
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue from the newest valid checkpoint of the run dir (auto) or from PATH")
    train.add_argument("--allow-changed", action="append", default=[], metavar="KEY[,KEY...]",
                       help="on resume, accept these changed config keys (or a whole section, e.g. data) although "
                            "they change what the run computes, e.g. data.root after copying the data")
    train.set_defaults(func=cmd_train)

    bank = sub.add_parser("bank", help="the soft-label bank: teacher outputs stored once, replayed by students")
    bank_sub = bank.add_subparsers(dest="action", required=True)
    build = bank_sub.add_parser("build", help="run the teachers over every planned crop and store their top-K")
    _add_config_args(build)
    build.add_argument("--out", required=True, metavar="BANK", help="bank folder (continued if it exists)")
    build.add_argument("--epochs", metavar="A:B", help="build epochs A..B-1 only (default: schedule.epochs)")
    build.add_argument("--top-k", type=int, metavar="K", help="probabilities kept per record (default bank.top_k=5)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_bank_build, on_interrupt="the chunks already built are kept: run the "
                       "same `fastmeal bank build` again to continue where it stopped")

    ev = sub.add_parser("eval", help="top-1/top-5 of a model on a val split (single centre crop, SPEC protocol)")
    _add_config_args(ev)
    ev.add_argument("--model", required=True, metavar="TAG", help="timm tag, e.g. resnet50 or resnet50.ram_in1k")
    ev.add_argument("--weights", metavar="FILE",
                    help=".pth/.pt/.safetensors (a released MEAL V2 file with module. keys loads); "
                         "default: the tag's pretrained weights")
    ev.add_argument("--data", required=True, metavar="DIR", help="dataset root holding val/<class>/*")
    ev.add_argument("--res", type=_positive_int, default=224, metavar="S", help="crop size S (default 224)")
    ev.add_argument("--resize", type=int, metavar="R", help="short side before the crop (default int(256/224*S))")
    ev.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch (default 256)")
    ev.add_argument("--workers", type=int, help="loader workers (default data.workers, at most the CPUs)")
    ev.add_argument("--backend", choices=("auto", *BACKENDS), help="image decoding (default data.backend)")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default runtime.device)")
    ev.add_argument("--precision", default="fp32", choices=("fp32", "amp", "amp-bf16", "amp-fp16"),
                    help="fp32 (default, the reference's numerics) or autocast")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="figures, report.html and report.md of run dirs (needs matplotlib)")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs (runtime.run_dir); several share "
                        "the axes, labelled by the config values that differ")
    report.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/report, ./report for several)")
    report.set_defaults(func=cmd_report)

    weights = sub.add_parser("weights", help="the weight files a preset needs, and fetching them for an offline "
                             "machine").add_subparsers(dest="action", required=True)
    wlist = weights.add_parser("list", help="list each weights file (student, teachers): timm tag, Hugging Face repo "
                               "and file, and whether it is here (HF_HUB_CACHE or the named file)")
    _add_config_args(wlist)
    wlist.set_defaults(func=cmd_weights_list)
    fetch = weights.add_parser("fetch", help="download them (needs network) into one folder in the Hugging Face "
                               "cache layout; on the offline machine set HF_HUB_CACHE to that folder")
    _add_config_args(fetch)
    fetch.add_argument("--out", required=True, metavar="DIR", help="folder to download into (HF cache layout)")
    fetch.set_defaults(func=cmd_weights_fetch)
    probe = sub.add_parser("probe", help="transfer: linear probe of frozen features on realms (OmniBenchmark protocol)")
    probe.add_argument("--model", required=True, metavar="TAG", help="timm tag of the backbone, e.g. resnet50")
    probe.add_argument("--weights", metavar="FILE", help="weights file (a fastmeal student, a released MEAL V2 file); "
                       "default: the tag's pretrained weights")
    probe.add_argument("--random-init", action="store_true", help="random weights (seed 0): the baseline to beat")
    probe.add_argument("--data", required=True, metavar="DIR", help="folder of realms: each with train/ val/ test/ "
                       "(ImageFolder) or train.txt val.txt test.txt ('relative/path label', OmniBenchmark)")
    probe.add_argument("--realms", metavar="A,B,...", help="only these realms (default: every realm in DIR)")
    probe.add_argument("--res", type=int, default=224, metavar="S", help="resize short side to S, centre crop S")
    probe.add_argument("--out", default="probe_out", metavar="DIR", help="where probe.json and probe.md go")
    probe.add_argument("--cache", metavar="DIR", help="feature cache (default $XDG_CACHE_HOME/fastmeal/probe)")
    probe.add_argument("--batch-size", type=int, default=128, help="images per extraction batch (per rank)")
    probe.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    probe.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    probe.add_argument("--steps", type=int, default=1000, help="L-BFGS steps per penalty (the protocol: 1000)")
    probe.add_argument("--eval-every", type=int, default=100, help="val/test accuracy every N steps (protocol: 100)")
    probe.add_argument("--solver", default="auto", choices=("auto", "batched", "per-lambda"),
                       help="fit all penalties as one batched problem or one after the other (same steps); auto: "
                       "batched on a GPU and for small problems on the CPU")
    probe.add_argument("--no-progress", action="store_true")
    probe.set_defaults(func=cmd_probe)

    demo = sub.add_parser("demo", help="end to end on the CPU: synthetic data, two teachers, a baseline, MEAL V2")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the dataset and of every training run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    _add_table_parser(sub)
    return parser


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOST_PEER, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 141
_TRAIN_INTERRUPTED = "checkpoints already written are intact: continue a training run with --resume auto"


def _interrupted(args: argparse.Namespace) -> int:
    print(f"fastmeal: interrupted (Ctrl-C); {getattr(args, 'on_interrupt', _TRAIN_INTERRUPTED)}", file=sys.stderr)
    return lifecycle.EXIT_INTERRUPTED


def _lost_peer(err: BaseException):
    """``err`` as a lost-peer error (:func:`fastmeal.distributed.lost_peer_error`), or None; never imports torch."""
    distributed = sys.modules.get("fastmeal.distributed")  # not imported: no process group, no peer to lose
    return distributed.lost_peer_error(err) if distributed is not None else None


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way it can end maps to an exit code (README, "Exit codes"), never to a hang.

    0 done (a preempted run included: it wrote its checkpoint); 1 the run failed (NaN loss, full disk,
    vanished run dir, or a bug: with its traceback); 2 bad input (config, data, weights, checkpoint,
    busy run dir, a path the system refuses: the message says how to fix it); 3 another rank is gone
    (killed, crashed, hung: one line, a restart continues); 130 Ctrl-C (a run stops after its step, with a
    checkpoint; a second Ctrl-C exits at once); 143/138 SIGTERM/SIGUSR1 outside training; 141 stdout
    closed early (``| head``). Stop signals only record a request (:mod:`fastmeal.lifecycle`); loader
    worker processes are ended on every path.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with lifecycle.handling_stops():
        try:
            code = args.func(args)
            sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is handled below
            if lifecycle.stop_requested() == "SIGINT":  # the command ended cleanly after the Ctrl-C: still 130
                raise lifecycle.Stopped("SIGINT")
            return code
        except lifecycle.Stopped as stop:
            if stop.reason == "SIGINT":
                return _interrupted(args)
            print(f"fastmeal: {stop}", file=sys.stderr)
            return stop.exit_code
        except KeyboardInterrupt:  # raised by code, not by fastmeal's handlers (a library's, a test's)
            return _interrupted(args)
        except ConfigError as err:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank reads the same config: say it once
                print(f"fastmeal: config error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except BrokenPipeError:
            # The reader (`| head`) is gone: say nothing more, and keep Python's exit-time flush from failing too.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except Exception as err:
            lost = _lost_peer(err)
            if lost is not None:  # another rank died or hangs: not this rank's bug, and a restart continues
                print(f"fastmeal: {lost}", file=sys.stderr)
                return EXIT_LOST_PEER
            if isinstance(err, _user_errors()):
                return _report_user_error(err)
            if isinstance(err, _failures()):
                print(f"fastmeal: error: {err}", file=sys.stderr)
                return EXIT_FAILED
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                print(f"fastmeal: error: no space left on the device writing {err.filename or 'a file'}: free some "
                      "space (checkpoints already written are intact)", file=sys.stderr)
                return EXIT_FAILED
            if isinstance(err, OSError) and err.filename is not None:
                return _report_user_error(_path_error(err))
            traceback.print_exc()
            print(f"fastmeal: error: unexpected {type(err).__name__} (a bug: please report it with the traceback "
                  "above)", file=sys.stderr)
            return EXIT_FAILED
        finally:
            lifecycle.close_loaders()
