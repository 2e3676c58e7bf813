"""`loqt-ray` command line: parse, validate, dispatch.

Every bad input becomes one line on stderr naming the field, and exit code 2,
before anything starts or anything on disk is written. Only the standard library
and config.py (PyYAML) load at start-up; each command imports what it needs, so
`--help` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import rundir
from .config import ConfigError, RunStopped, load_config

DESCRIPTION = """Pretrain LLaMA-style models with LoQT: weights in NF4, trained through low-rank
factors that are merged back on a schedule. Training runs under Ray Train with DeepSpeed ZeRO
on one or more workers; sweeps search LoQT settings with Ray Tune, Optuna and ASHA."""
EPILOG = """examples:
  loqt-ray train --config jobs/demo.yaml --set loqt.rank=64
  loqt-ray sweep jobs/sweep.yaml
  loqt-ray memory --model 7b --rank 1024 --optimizer adam8bit --per-layer --gpu-gb 23
  loqt-ray export-hf runs/demo hf/demo"""

# `loqt-ray memory` shorthands: each is exactly `--set FIELD=VALUE` (flags: `--set FIELD=true`).
MEMORY_SHORTHANDS = {
    "--model": ("model.size", "model size (model.size)"),
    "--rank": ("loqt.rank", "LoQT rank (loqt.rank)"),
    "--optimizer": ("optim.name", "adamw or adam8bit (optim.name)"),
    "--batch": ("train.micro_batch_size", "micro-batch size in sequences (train.micro_batch_size)"),
    "--seq": ("data.seq_len", "sequence length (data.seq_len)"),
    "--vocab": ("data.vocab_size", "vocabulary size (data.vocab_size)"),
}
MEMORY_FLAGS = {
    "--per-layer": ("optim.per_layer", "per-layer optimizer updates (optim.per_layer)"),
    "--quantize-projection": ("loqt.quantize_projection", "P in NF4 or dense (loqt.quantize_projection)"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (sections: model, data, loqt, optim, train, scale)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loqt.rank=64 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from .launch import run_training

    final = run_training(cfg)
    print(
        f"done: {cfg.train.name} step {final['step']} tokens {final['tokens']:,} "
        f"val_ppl {final['val_ppl']:.2f} tokens/s {final['tokens_per_s']:.0f}"
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from .data import prepare

    print(json.dumps(prepare(cfg.data).info, indent=1))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .export import describe
    from .sweep_plan import dry_run
    from .tune_run import run_sweep

    if args.dry_run:
        print(dry_run(args.sweep_file, args.overrides))
        return 0
    sweep_dir = run_sweep(args.sweep_file, args.overrides, args.warm_start)  # validated before a cluster
    print((sweep_dir / rundir.LEADERBOARD_FILE).read_text(), end="")
    best = sweep_dir / rundir.BEST_FILE
    print(describe(best) if best.exists() else "no trial reported a validation perplexity: nothing exported")
    print(f"sweep: {sweep_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import describe, export

    if Path(args.output).exists() and not args.force:
        raise ConfigError(args.output, "exists; pass --force to overwrite it")
    export(args.sweep_dir, args.output)
    print(describe(Path(args.output)))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import textwrap

    from .config import SECTIONS, describe_section

    for section in [args.section] if args.section else list(SECTIONS):
        for name, kind, default, doc in describe_section(section):
            shown = "none" if default is None else default
            print(f"{name}  ({kind}; default {shown})")
            print(textwrap.fill(doc, width=100, initial_indent="    ", subsequent_indent="    "))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"wrote {write_report(args.sweep_dir, args.output)}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .export_hf import export_hf

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(str(out), "exists and is not empty; pass --force to write into it")
    export_hf(args.source, out, args.dtype)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _memory_overrides(args: argparse.Namespace) -> list[str]:
    """The shorthands given, as the --set assignments they stand for, before the explicit --set ones."""
    sets = []
    for flag, (field, _) in {**MEMORY_SHORTHANDS, **MEMORY_FLAGS}.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:  # a flag left out keeps the config's value (True/False parse as YAML)
            sets.append(f"{field}={value}")
    return sets + args.overrides


def cmd_memory(args: argparse.Namespace) -> int:
    if args.gpu_gb is not None and args.gpu_gb <= 0:
        raise ConfigError("--gpu-gb", f"must be > 0 (got {args.gpu_gb})")
    cfg = load_config(args.config, _memory_overrides(args))
    if cfg.model.path is not None:
        raise ConfigError("model.path", "the estimator needs a registry size (model.size), not a local model")
    from . import memory

    if args.gpu_gb is None:  # the config's GPU, when it names one
        args.gpu_gb = cfg.scale.gpu_memory_gb
    if args.gpu_gb is not None:  # a question about a GPU: estimate the run on one
        cfg.scale.use_gpu = True
    device = "a GPU" if cfg.scale.use_gpu else "the CPU"
    print(
        f"{cfg.model.size}, {cfg.loqt.method} rank {cfg.loqt.rank}, vocab {cfg.data.vocab_size}, "
        f"micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}, on {device}"
    )
    if args.paper:
        _print_paper_accounting(cfg, args, memory)
    else:
        estimate = memory.trainer_estimate(cfg)
        print(f"as this trainer holds it: {estimate.engine}")
        print(memory.trainer_table(estimate, cfg.train.micro_batch_size, cfg.data.seq_len))
    if args.gpu_gb is not None:
        fits, peak = memory.largest_trainer_batch(cfg, args.gpu_gb)
        print(
            f"largest micro-batch within {args.gpu_gb:g} GiB: {fits} "
            f"(peak {peak / memory.GIB:.1f} GiB, refresh steps included)"
        )
    return 0


def _print_paper_accounting(cfg, args: argparse.Namespace, memory) -> None:
    """The paper's Table 3 accounting for five methods, every dense value `--dtype` wide."""
    a = memory.assumptions_for(cfg, {"bf16": 2.0, "fp32": 4.0}[args.dtype])
    methods = [args.method] if args.method != "all" else list(memory.METHODS)
    print(
        f"the paper's accounting: {a.optimizer}, {args.dtype} weights/gradients/states/activations, "
        f"NF4 block {a.block_size}{' + double quant' if a.double_quant else ''}"
        f"{', P in NF4' if a.quantize_projection else ''}{', per-layer updates' if a.per_layer else ''}"
    )
    shape = (cfg.model.size, cfg.loqt.rank, cfg.data.vocab_size)
    print(memory.table(*shape, cfg.train.micro_batch_size, cfg.data.seq_len, a, methods))
    if args.gpu_gb is None:
        return
    for method in methods:
        size, rank, vocab = shape
        fits = memory.largest_batch(size, method, rank, args.gpu_gb, vocab, cfg.data.seq_len, a)
        print(
            f"{method} (paper): largest micro-batch within {args.gpu_gb:g} GiB before refresh steps: {fits}"
        )


class _OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line (no usage dump), exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_memory_parser(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="estimate what training allocates (weights, master copy, gradients, states, activations, "
        "refresh steps); --paper for the paper's accounting of five methods",
        description="Settings come from --config/--set like every command; the shorthands below are "
        "exactly --set of the field named in brackets.",
    )
    _add_config_args(p)
    for flag, (_, text) in MEMORY_SHORTHANDS.items():
        p.add_argument(flag, help=text)
    for flag, (_, text) in MEMORY_FLAGS.items():
        p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's Table 3 accounting for full-rank, LoRA, GaLore, LoQT and LoQT-nq instead of "
        "what this trainer allocates",
    )
    p.add_argument(
        "--method",
        default="all",
        choices=["all", "full", "lora", "galore", "loqt", "loqt-nq"],
        help="with --paper: the column(s) to show",
    )
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="with --paper: width of weights, gradients, Adam moments and activations",
    )
    p.add_argument(
        "--gpu-gb",
        type=float,
        help="estimate the run on a GPU and print the largest micro-batch whose refresh-step peak "
        "fits this many GiB (default: scale.gpu_memory_gb, when set)",
    )
    p.set_defaults(func=cmd_memory)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="loqt-ray",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (LoQT, LoQT-nq or full-rank); rerun to resume")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "data", help="prepare the data (documents, tokenizer, packed sequences) and print its size"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("sweep", help="Ray Tune + Optuna + ASHA over a search space; rerun to resume")
    p.add_argument("sweep_file", help="a sweep YAML such as jobs/sweep.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the validated space, trial count, token budget and resources, then exit (no Ray)",
    )
    p.add_argument(
        "--warm-start",
        metavar="SWEEP_DIR",
        help="seed the search with the finished trials of another sweep of the same space",
    )
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("export", help="write the best trial of a sweep as a production training config")
    p.add_argument("sweep_dir")
    p.add_argument("-o", "--output", default=rundir.BEST_FILE)
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("export-hf", help="fold a trained run into a plain Hugging Face LlamaForCausalLM")
    p.add_argument("source", help="a run directory, one of its checkpoint_* directories, or a state.pt")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_export_hf)
    _add_memory_parser(sub)
    p = sub.add_parser(
        "config", help="every config field with its type, default and meaning (training and sweep files)"
    )
    p.add_argument(
        "section", nargs="?", help="one section: model, data, loqt, optim, train, scale, sweep, asha"
    )
    p.set_defaults(func=cmd_config)
    p = sub.add_parser(
        "report", help="plots (val ppl vs tokens, importances) and a markdown summary of a sweep"
    )
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
    except RunStopped as exc:
        print(f"loqt-ray {args.command}: stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
