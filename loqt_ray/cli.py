"""`loqt-ray` command line: parse, validate, dispatch. No logic of its own.

Every bad input becomes one line on stderr naming the field, and exit code 2,
before anything starts or anything on disk is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import NF4_BLOCK_SIZES, ConfigError, RunStopped, load_config
from .memory import METHODS, OPTIMIZERS
from .models import MODEL_SIZES


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
    from .sweep import run_sweep

    sweep_dir = run_sweep(args.sweep_file, args.overrides)  # validates everything before a cluster starts
    print((sweep_dir / "leaderboard.md").read_text(), end="")
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


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .export_hf import export_hf

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(str(out), "exists and is not empty; pass --force to write into it")
    export_hf(args.source, out, args.dtype)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from .memory import GIB, Assumptions, estimate, largest_batch, table

    for name in ("rank", "vocab", "batch", "seq"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}", f"must be a positive integer (got {getattr(args, name)})")
    if args.gpu_gb is not None and args.gpu_gb <= 0:
        raise ConfigError("--gpu-gb", f"must be > 0 (got {args.gpu_gb})")
    width = {"bf16": 2.0, "fp32": 4.0}[args.dtype]
    a = Assumptions(param_bytes=width, grad_bytes=width, state_bytes=width, activation_bytes=width,
                    optimizer=args.optimizer, block_size=args.block_size, double_quant=not args.no_double_quant,
                    quantize_projection=args.quantize_projection, per_layer=args.per_layer)
    methods = [args.method] if args.method != "all" else list(METHODS)
    print(f"{args.model}, rank {args.rank}, vocab {args.vocab}, {args.optimizer}, {args.dtype} weights/gradients/"
          f"states/activations, NF4 block {a.block_size}{' + double quant' if a.double_quant else ''}"
          f"{', P in NF4' if a.quantize_projection else ''}{', per-layer updates' if a.per_layer else ''}")
    print(table(args.model, args.rank, args.vocab, args.batch, args.seq, a, methods))
    if args.gpu_gb is not None:
        for m in methods:
            b = largest_batch(args.model, m, args.rank, args.gpu_gb, args.vocab, args.seq, a)
            peak = estimate(args.model, m, args.rank, args.vocab, max(b, 1), args.seq, a)
            print(f"{m}: largest micro-batch within {args.gpu_gb:g} GiB at seq {args.seq}: {b}"
                  + (f" (refresh steps add {peak.refresh_capture / GIB:.1f} GiB of gradient capture)"
                     if peak.refresh_capture else ""))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line (no usage dump), exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="loqt-ray", description=__doc__.splitlines()[0])
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
    p = sub.add_parser("export-hf", help="fold a trained run into a plain Hugging Face LlamaForCausalLM")
    p.add_argument("source", help="a run directory, one of its checkpoint_* directories, or a state.pt")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_export_hf)
    p = sub.add_parser("memory", help="estimate training memory per component (weights, gradients, states, "
                                      "activations) for full-rank, LoRA, GaLore, LoQT and LoQT-nq")
    p.add_argument("--model", required=True, choices=list(MODEL_SIZES))
    p.add_argument("--method", default="all", choices=["all", *METHODS])
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (sequences)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--block-size", type=int, default=64, choices=list(NF4_BLOCK_SIZES))
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--quantize-projection", action="store_true", help="P in NF4 too (the paper's memory column)")
    p.add_argument("--per-layer", action="store_true", help="per-layer optimizer updates: gradients freed in backward")
    p.add_argument("--gpu-gb", type=float, help="also print the largest micro-batch that fits this many GiB")
    p.set_defaults(func=cmd_memory)
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
    except RunStopped as exc:
        print(f"loqt-ray {args.command}: stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
