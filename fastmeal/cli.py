"""The ``fastmeal`` command: parse → build the config → call one function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from fastmeal.config import PRESETS, ConfigError, build_config, parse_set_args


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
    print(f"# preset {args.preset} (resolved)")
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            print(f"{section} = {values!r}")
            continue
        print(f"[{section}]")
        for key, value in values.items():
            print(f"  {key} = {json.dumps(value)}")
    print(f"# lr regime: epoch 0: {cfg.lr_at(0)}"
          + "".join(f", epoch {e}: {lr}" for e, lr in cfg.schedule.lr_steps)
          + f"; eval: resize {cfg.data.resolved_eval_resize} -> crop {cfg.data.image_size}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fastmeal.data.synthetic import synthesize

    summary = synthesize(args.out, num_classes=args.classes, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, seed=args.seed, size_range=tuple(args.size_range),
                         oddities=args.oddities, progress=not args.no_progress)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from fastmeal.data.check import check_dataset, format_report

    report = check_dataset(args.dir, progress=not args.no_progress)
    print(format_report(report))
    return 0 if report.ok else 1


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
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(func=cmd_data_synth)
    check = data.add_parser("check", help="count images and list every problem by path (exit 1 on problems)")
    check.add_argument("dir")
    check.add_argument("--no-progress", action="store_true")
    check.set_defaults(func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fastmeal: config error: {err}", file=sys.stderr)
        return 2
