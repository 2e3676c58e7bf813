"""`loqt-ray` command line: parse, validate, dispatch. No logic of its own.

Every bad input becomes one line on stderr naming the field, and exit code 2,
before anything starts or anything on disk is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (sections: model, data, loqt, optim, train, scale)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loqt.rank=64 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from .launch import run_training

    cfg = load_config(args.config, args.overrides)
    final = run_training(cfg)
    print(f"done: {cfg.train.name} step {final['step']} tokens {final['tokens']:,} "
          f"val_ppl {final['val_ppl']:.2f} tokens/s {final['tokens_per_s']:.0f}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import prepare

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(prepare(cfg.data).info, indent=1))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import leaderboard, leaderboard_markdown, load_sweep, run_sweep

    load_sweep(args.sweep_file, args.overrides)  # every check before a cluster starts
    sweep_dir = run_sweep(args.sweep_file, args.overrides)
    print(leaderboard_markdown(leaderboard(sweep_dir)), end="")
    print(f"sweep: {sweep_dir}  best config: {sweep_dir / 'best.yaml'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .sweep import export

    if Path(args.output).exists() and not args.force:
        raise ConfigError(args.output, "exists; pass --force to overwrite it")
    data = export(args.sweep_dir, args.output)
    p = data["provenance"]
    print(f"wrote {args.output}: trial {p['trial']} val_ppl {p['val_ppl']:.2f} after {p['tokens']:,} tokens")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.sweep_dir, args.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loqt-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (LoQT, LoQT-nq or full-rank)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("data", help="prepare the data (documents, tokenizer, packed sequences) and print its size")
    _add_config_args(p)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("sweep", help="Ray Tune + Optuna + ASHA over a search space; rerun to resume")
    p.add_argument("sweep_file", help="a sweep YAML such as jobs/sweep.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("export", help="write the best trial of a sweep as a production training config")
    p.add_argument("sweep_dir")
    p.add_argument("-o", "--output", default="best.yaml")
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("report", help="plots (val ppl vs tokens, importances) and a markdown summary of a sweep")
    p.add_argument("sweep_dir")
    p.add_argument("-o", "--output", help="report directory (default: SWEEP_DIR/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"loqt-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
