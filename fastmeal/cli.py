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


def cmd_probe(args: argparse.Namespace) -> int:
    from fastmeal.distributed import init_distributed, shutdown
    from fastmeal.models.backbone import build_backbone
    from fastmeal.probe import run_probe

    _setup_logging()
    info = init_distributed(args.device)
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
    probe.set_defaults(func=cmd_probe, preload=TRAINING)

    demo = sub.add_parser("demo", help="end to end on the CPU: synthetic data, two teachers, a baseline, MEAL V2")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the dataset and of every training run")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo, preload=TRAINING)
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
