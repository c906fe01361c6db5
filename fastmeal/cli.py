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

from fastmeal.config import PRESETS, ConfigError, build_config, parse_set_args, to_toml
from fastmeal.signals import ctrl_c_remembered


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
                         oddities=args.oddities, progress=not args.no_progress, num_workers=args.workers)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from fastmeal.data.check import check_dataset, format_report

    report = check_dataset(args.dir, progress=not args.no_progress, num_workers=args.workers)
    print(format_report(report))
    return 0 if report.ok else 1


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
    from fastmeal.models.factory import WeightsError
    from fastmeal.rundir import RunDirError
    from fastmeal.trainer import SetupError

    return CheckpointError, DataError, WeightsError, SetupError, RunDirError


def _failures() -> tuple[type[Exception], ...]:
    """Errors of a run that went wrong (not of the input): one line, exit 1; their message says what happened."""
    from fastmeal.checkpoint import DiskFullError
    from fastmeal.rundir import RunDirVanishedError
    from fastmeal.trainer import NonFiniteError

    return DiskFullError, NonFiniteError, RunDirVanishedError


def _report_user_error(err: Exception) -> int:
    print(f"fastmeal: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_train(args: argparse.Namespace) -> int:
    from fastmeal.metrics import finite_json
    from fastmeal.trainer import train

    cfg = config_from_args(args, **{"runtime.resume": args.resume})
    _setup_logging()
    summary = train(cfg)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from fastmeal.evaluate import evaluate_config
    from fastmeal.metrics import finite_json

    extra = {"model.student": args.model, "model.student_weights": args.weights, "data.root": args.data,
             "data.image_size": args.res, "data.eval_resize": args.resize, "data.eval_batch_size": args.batch_size,
             "data.workers": args.workers, "data.backend": args.backend, "runtime.device": args.device,
             "precision.mode": args.precision}
    cfg = config_from_args(args, **{k: str(v) for k, v in extra.items() if v is not None})
    _setup_logging()
    result = evaluate_config(cfg, progress=not args.no_progress)
    if args.json:
        print(json.dumps(finite_json(result), indent=2, allow_nan=False))
    else:
        print(f"{result['model']} ({result['weights']}) at {result['image_size']} px (resize {result['eval_resize']}):"
              f" top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"[{result['count']} images, {result['images_per_s']:.1f} img/s on {result['device']}]")
    return 0


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
        p.set_defaults(func=cmd_table)
    verbs.choices["report"].set_defaults(func=cmd_table)


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
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--train-per-class", type=int, default=100)
    synth.add_argument("--val-per-class", type=int, default=20)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size-range", type=int, nargs=2, default=(64, 112), metavar=("LO", "HI"),
                       help="short side in pixels (ImageNet-like: 375 500)")
    synth.add_argument("--oddities", action="store_true",
                       help="add grayscale, CMYK, progressive JPEGs and a PNG named .JPEG, as ImageNet has")
    synth.add_argument("--workers", type=int, default=1, help="processes (the files do not depend on it)")
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(func=cmd_data_synth, preload=("fastmeal.data",))
    check = data.add_parser("check", help="count images and list every problem by path (exit 1 on problems)")
    check.add_argument("dir")
    check.add_argument("--workers", type=int, default=1, help="processes decoding files in parallel")
    check.add_argument("--no-progress", action="store_true")
    check.set_defaults(func=cmd_data_check, preload=("fastmeal.data",))

    train = sub.add_parser("train", help="train (MEAL V2 distillation, or hard labels with loss.mode=ce)")
    _add_config_args(train)
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue from the newest valid checkpoint of the run dir (auto) or from PATH")
    train.set_defaults(func=cmd_train, preload=TRAINING)

    bank = sub.add_parser("bank", help="the soft-label bank: teacher outputs stored once, replayed by students")
    bank_sub = bank.add_subparsers(dest="action", required=True)
    build = bank_sub.add_parser("build", help="run the teachers over every planned crop and store their top-K")
    _add_config_args(build)
    build.add_argument("--out", required=True, metavar="BANK", help="bank folder (continued if it exists)")
    build.add_argument("--epochs", metavar="A:B", help="build epochs A..B-1 only (default: schedule.epochs)")
    build.add_argument("--top-k", type=int, metavar="K", help="probabilities kept per record (default bank.top_k=5)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=cmd_bank_build, preload=TRAINING)

    ev = sub.add_parser("eval", help="top-1/top-5 of a model on a val split (single centre crop, SPEC protocol)")
    _add_config_args(ev)
    ev.add_argument("--model", required=True, metavar="TAG", help="timm tag, e.g. resnet50 or resnet50.ram_in1k")
    ev.add_argument("--weights", metavar="FILE",
                    help=".pth/.pt/.safetensors (a released MEAL V2 file with module. keys loads); "
                         "default: the tag's pretrained weights")
    ev.add_argument("--data", required=True, metavar="DIR", help="dataset root holding val/<class>/*")
    ev.add_argument("--res", type=int, default=224, metavar="S", help="crop size S (default 224)")
    ev.add_argument("--resize", type=int, metavar="R", help="short side before the crop (default int(256/224*S))")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--workers", type=int, help="loader workers (default data.workers, at most the CPUs)")
    ev.add_argument("--backend", choices=("auto", "dali", "torchvision"))
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--precision", default="fp32", choices=("fp32", "amp", "amp-bf16", "amp-fp16"),
                    help="fp32 (default, the reference's numerics) or autocast")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval, preload=TRAINING)

    report = sub.add_parser("report", help="figures, report.html and report.md of run dirs (needs matplotlib)")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs (runtime.run_dir); several share "
                        "the axes, labelled by the config values that differ")
    report.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/report, ./report for several)")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="end to end on the CPU: synthetic data, two teachers, a baseline, MEAL V2")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the dataset and of every training run")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo, preload=TRAINING)

    _add_table_parser(sub)
    return parser


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141

# What a command imports first, with Ctrl-C held back until the imports are done (main). torch, numpy,
# timm and torchvision take seconds to import; a Ctrl-C inside one leaves it half-imported and unusable.
# DALI's torch plugin even swallows it: the run trained on. A name ending in "?" is imported when installed.
TRAINING = ("fastmeal.trainer", "nvidia.dali.fn?", "nvidia.dali.plugin.pytorch?")


def _interrupted() -> int:
    print("fastmeal: interrupted (Ctrl-C); checkpoints already written are intact: continue a training run "
          "with --resume auto", file=sys.stderr)
    return EXIT_INTERRUPTED


def _raised_while_interrupted(err: BaseException) -> bool:
    """Whether ``err`` came while a KeyboardInterrupt was being handled (its context chain holds one)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _preload(modules: tuple[str, ...]) -> None:
    import importlib
    import signal

    from fastmeal.signals import signals_deferred

    with signals_deferred([signal.SIGINT]):
        for module in modules:
            if not module.endswith("?"):
                importlib.import_module(module)
            elif _installed(module[:-1]):
                # A broken optional install fails later, where it is used (data.backend=dali), not here.
                with contextlib.suppress(Exception):
                    importlib.import_module(module[:-1])


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is absent (no `nvidia` namespace at all)
        return False


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way it can end maps to an exit code (README, "Exit codes"), never to a hang.

    0 done (a preempted run included: it wrote its checkpoint); 1 the run failed (NaN loss, full disk,
    vanished run dir, or a bug: with its traceback); 2 bad input (config, data, weights, checkpoint,
    busy run dir: the message says how to fix it); 130 Ctrl-C; 141 stdout closed early (``| head``).
    Loader worker processes are ended on every path.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with ctrl_c_remembered():
            _preload(getattr(args, "preload", ()))
            code = args.func(args)
        sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is handled below
        return code
    except ConfigError as err:
        print(f"fastmeal: config error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:
        # The reader (`| head`) is gone: say nothing more, and keep Python's exit-time flush from failing too.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as err:
        if _raised_while_interrupted(err):  # a library's clean-up failed on the way out of a Ctrl-C
            return _interrupted()
        if isinstance(err, _user_errors()):
            return _report_user_error(err)
        if isinstance(err, _failures()):
            print(f"fastmeal: error: {err}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"fastmeal: error: no space left on the device writing {err.filename or 'a file'}: free some space "
                  "(checkpoints already written are intact)", file=sys.stderr)
            return EXIT_FAILED
        traceback.print_exc()
        print(f"fastmeal: error: unexpected {type(err).__name__} (a bug: please report it with the traceback above)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        # Not imported yet (a Ctrl-C during start-up, maybe inside torch's import): no loader to close, and
        # importing it now would meet a half-imported torch.
        data = sys.modules.get("fastmeal.data")
        if data is not None:
            data.close_loaders()
