"""Each method at its own best learning rate, at two horizons, tuned the way a user would.

Full-rank AdamW, LoQT, LoQT-nq and two LoQT ablations (no error compensation; a static
merge schedule) each run as one `loqt-ray` sweep over a grid space (every lr of --lrs x
seeds 0 and 1, ASHA off, one evaluation at the end); GaLore (PyPI galore-torch) runs the
same grid through this bench's own engine, outside the sweep. Every run sees the same
tokens in the same order (same data seed); the optimizer settings not in the grid are the
project's defaults, so the LoQT run at its default lr is also "LoQT left at its defaults".
The long horizon is --factor times the short one. Prints one table per horizon and writes
bench/results/quality.json (`best_vs_best`: each method's best over full-rank's best at
the long horizon). Sweeps resume when rerun, so an interrupted bench picks up where it was.

    .venv/bin/python bench/bench_quality.py [--short-steps 50] [--factor 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from bench_loqt import GaLoreEngine
from recipe import write_result

from loqt_ray.config import DEFAULT_LR, load_config
from loqt_ray.leaderboard import leaderboard
from loqt_ray.trainer import Trainer
from loqt_ray.tune_run import run_sweep

ROOT = Path(__file__).resolve().parent.parent
SWEPT = {
    "full": {"loqt": {"method": "full"}},
    "loqt": {"loqt": {"method": "loqt"}},
    "loqt-nq": {"loqt": {"method": "loqt-nq"}},
    "loqt-nocomp": {"loqt": {"method": "loqt", "compensation_iters": 0}},
    "loqt-static": {"loqt": {"method": "loqt", "schedule": "static"}},
}
SEEDS = (0, 1)
SEQ, MICRO_BATCH, RANK = 128, 8, 32


def trial_base(method: dict) -> dict:
    """The config every trial of a method starts from: the tiny LLaMA, rank 32 of 128, merges from
    tau = 25 growing by psi = 1.5 (the reference's tau = 100 / psi = 1.2 spans 10k steps)."""
    loqt = {"rank": RANK, "lora_alpha": 0.5, "update_interval": 25, "psi": 1.5, **method["loqt"]}
    return {
        "model": {"size": "tiny"},
        "data": {"data_dir": str(ROOT / "data"), "seq_len": SEQ},
        "loqt": loqt,
        "train": {"micro_batch_size": MICRO_BATCH, "eval_tokens": 32768},
        "scale": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 0},
    }


def sweep_method(name: str, steps: int, lrs: list[float], work: Path) -> dict[tuple, float]:
    """One sweep over lr x seed for a method; {(lr, seed): final val ppl}."""
    tokens = steps * MICRO_BATCH * SEQ
    space = work / f"{name}-space.yaml"
    space.write_text(
        yaml.safe_dump({"params": {"optim.lr": {"grid": lrs}, "train.seed": {"grid": list(SEEDS)}}})
    )
    spec = {
        "sweep": {
            "name": f"{name}-{steps}",
            "storage_path": str(work / "sweeps"),
            "search_space": str(space),
            "num_samples": 1,
            "max_concurrent_trials": 2,
            "tokens_per_trial": tokens,
            "eval_every_tokens": tokens,
        },
        "asha": {"enabled": False},
        "trial": trial_base(SWEPT[name]),
    }
    path = work / f"{name}-{steps}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = leaderboard(run_sweep(path))
    return {(r["params"]["optim.lr"], r["params"]["train.seed"]): r["val_ppl"] for r in rows}


def galore(steps: int, lrs: list[float], work: Path) -> dict[tuple, float]:
    """The same grid for GaLore in this process; each finished run is cached in work/."""
    cache = work / f"galore-{steps}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    base = trial_base({"loqt": {"method": "full"}})
    for lr in lrs:
        for seed in SEEDS:
            key = f"{lr}/{seed}"
            if key in done:
                continue
            overrides = [f"{section}.{k}={v}" for section, values in base.items() for k, v in values.items()]
            cfg = load_config(
                None,
                [*overrides, f"train.steps={steps}", f"train.eval_every={steps}", f"train.log_every={steps}",
                 f"optim.lr={lr}", f"train.seed={seed}", f"train.output_dir={work / 'galore-runs'}"],
            )  # fmt: skip
            done[key] = Trainer(cfg, make_engine=GaLoreEngine).train()["val_ppl"]
            cache.write_text(json.dumps(done))
            print(f"galore {steps} steps lr {lr} seed {seed}: val ppl {done[key]:.2f}", file=sys.stderr)
    return {(float(k.split("/")[0]), int(k.split("/")[1])): v for k, v in done.items()}


def summarize(runs: dict[tuple, float], lrs: list[float]) -> dict:
    by_lr = {lr: [runs[(lr, seed)] for seed in SEEDS] for lr in lrs}
    means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
    best = min(means, key=means.get)
    return {
        "by_lr": {str(lr): v for lr, v in by_lr.items()},
        "best_lr": best,
        "mean": means[best],
        "spread": (max(by_lr[best]) - min(by_lr[best])) / 2,  # half the range over the seeds
    }


def table(methods: dict[str, dict], steps: int) -> list[str]:
    full = methods["full"]["mean"]
    lines = [
        f"{steps} steps ({steps * MICRO_BATCH * SEQ:,} tokens):",
        "| method | best val ppl (mean ± half-range, 2 seeds) | / full-rank best | best lr | "
        "val ppl at the default lr |",
        "|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        default_lr = DEFAULT_LR.get(name, DEFAULT_LR["loqt"] if name != "galore" else None)
        at_default = m["by_lr"].get(str(default_lr))
        shown = f"{statistics.fmean(at_default):.2f} (lr {default_lr:g})" if at_default else "-"
        lines.append(
            f"| {name} | {m['mean']:.2f} ± {m['spread']:.2f} | {m['mean'] / full:.3f} | {m['best_lr']:g} | "
            f"{shown} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short-steps", type=int, default=50)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--work", default="runs/bench_quality", help="sweeps and caches (resumable)")
    ap.add_argument("--out", default="bench/results/quality.json")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        import galore_torch  # noqa: F401

        with_galore = True
    except ImportError:
        print("galore-torch not installed (pip install galore-torch): skipping GaLore", file=sys.stderr)
        with_galore = False
    horizons, lines, start = {}, [], time.perf_counter()
    for steps in (args.short_steps, args.short_steps * args.factor):
        methods = {name: summarize(sweep_method(name, steps, args.lrs, work), args.lrs) for name in SWEPT}
        if with_galore:
            methods["galore"] = summarize(galore(steps, args.lrs, work), args.lrs)
        full = methods["full"]["mean"]
        for m in methods.values():
            m["ratio"] = m["mean"] / full
        horizons[str(steps)] = {"steps": steps, "tokens": steps * MICRO_BATCH * SEQ, "methods": methods}
        lines += [*table(methods, steps), ""]
        print("\n".join(lines), file=sys.stderr)
    long = horizons[str(args.short_steps * args.factor)]["methods"]
    result = {
        "settings": {"short_steps": args.short_steps, "factor": args.factor, "lrs": args.lrs, "seeds": SEEDS,
                     "trial": trial_base(SWEPT["loqt"]), "default_lr": DEFAULT_LR},
        "wall_s": time.perf_counter() - start,
        "horizons": horizons,
        "best_vs_best": {name: m["ratio"] for name, m in long.items()},
        "table": lines,
    }  # fmt: skip
    print("\n".join(lines))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
