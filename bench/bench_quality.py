"""Each method tuned over the same two knobs by the same rule, at two horizons.

The knobs: the learning rate, and the step of the attention and MLP matrices apart from it. The
scale s multiplies the wrapped matrices' step in LoQT and LoQT-nq (loqt.lora_alpha), GaLore has
its own scale (taken from loqt.lora_alpha here, so one field serves both), and full-rank gets the
same freedom through optim.matrix_lr_ratio (the matrices' learning rate over the rest's). Every
method starts from --lrs x its three knob values x seeds 0 and 1, and a grid whose best lies on
its edge grows past that edge (up to 4 values a side), by the same rule for every method. All
runs are in this process, on the same tokens in the same order (the same data seed), every
other setting at the project's defaults: the tiny LLaMA, rank 32, merges from tau = 25 growing by
psi = 1.5. Then, at each method's tuned setting, the ablations (LoQT without compensation, with a
static schedule), and LoQT at its defaults.

Prints one table per horizon, writes bench/results/quality.json and the sensitivity heat maps
(val ppl over lr x knob at the long horizon) to docs/quality_heatmap.png. Finished runs are cached
under --work, so an interrupted bench picks up where it was.

    .venv/bin/python bench/bench_quality.py [--short-steps 40] [--factor 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_loqt import GaLoreEngine
from recipe import write_result

from loqt_ray.config import load_config
from loqt_ray.engine import PlainEngine
from loqt_ray.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
# method -> (its settings, the knob it tunes beside the lr, the knob's values)
METHODS = {
    "full": (["loqt.method=full"], "optim.matrix_lr_ratio", (0.25, 0.5, 1.0)),
    "loqt": (["loqt.method=loqt"], "loqt.lora_alpha", (0.125, 0.25, 0.5)),
    "loqt-nq": (["loqt.method=loqt-nq"], "loqt.lora_alpha", (0.125, 0.25, 0.5)),
    "galore": (["loqt.method=full"], "loqt.lora_alpha", (0.125, 0.25, 0.5)),
}
ABLATIONS = {  # run at LoQT's tuned lr and scale
    "loqt, no compensation": ["loqt.compensation_iters=0"],
    "loqt, static schedule": ["loqt.schedule=static"],
}
SEEDS = (0, 1)
MAX_SIDE = 4  # values a grid's side grows to at most
SEQ, MICRO_BATCH, RANK = 128, 8, 32


def recipe(steps: int, data_dir: str) -> list[str]:
    return [
        "model.size=tiny", f"data.data_dir={data_dir}", f"data.seq_len={SEQ}", f"loqt.rank={RANK}",
        "loqt.update_interval=25", "loqt.psi=1.5", f"train.micro_batch_size={MICRO_BATCH}",
        "train.eval_tokens=32768", f"train.steps={steps}", f"train.eval_every={steps}",
        f"train.log_every={steps}",
    ]  # fmt: skip


class Runs:
    """Finished runs' val ppl by their settings, cached in a JSON file."""

    def __init__(self, path: Path, data_dir: str):
        self.path, self.data_dir = path, data_dir
        self.done = json.loads(path.read_text()) if path.exists() else {}

    def val_ppl(self, method: str, steps: int, settings: list[str], trainer: type = Trainer) -> float:
        """One run's val ppl; `trainer` another Trainer class (bench_residual.py's) for a variant."""
        variant = "" if trainer is Trainer else f" ({trainer.__name__})"
        key = f"{method}{variant} {steps} " + " ".join(sorted(settings))
        if key not in self.done:
            cfg = load_config(None, recipe(steps, self.data_dir) + METHODS[method][0] + settings)
            engine = GaLoreEngine if method == "galore" else PlainEngine
            self.done[key] = trainer(cfg, make_engine=engine).train()["val_ppl"]
            self.path.write_text(json.dumps(self.done, indent=0))
            print(f"{key}: {self.done[key]:.2f}", file=sys.stderr, flush=True)
        return self.done[key]

    def seeds(self, method: str, steps: int, settings: list[str]) -> list[float]:
        return [self.val_ppl(method, steps, [*settings, f"train.seed={seed}"]) for seed in SEEDS]


def neighbour(value: float, knob: str, up: bool) -> float:
    """The next grid value past an edge: lrs on the 1-3-10 ladder, the scale and ratio doubled or halved."""
    if knob != "optim.lr":
        return value * 2 if up else value / 2
    mantissa, exponent = (int(part) for part in f"{value:.0e}".split("e"))
    if up:
        mantissa, exponent = (3, exponent) if mantissa == 1 else (1, exponent + 1)
    else:
        mantissa, exponent = (1, exponent) if mantissa == 3 else (3, exponent - 1)
    return float(f"{mantissa}e{exponent}")


def tune(runs: Runs, method: str, steps: int, lrs: list[float]) -> dict:
    """The grid's val ppl (mean over seeds) and its best point.

    A best on the grid's edge is not a tuned setting, only a direction: the grid grows by one
    row or column on that side until its best is inside it or it reaches MAX_SIDE values a side.
    Every method starts from the same lrs x its three knob values and follows the same rule.
    """
    _, knob, values = METHODS[method]
    axes = {"optim.lr": sorted(lrs), knob: sorted(values)}
    grid: dict[tuple[float, float], list[float]] = {}
    while True:
        for lr in axes["optim.lr"]:
            for value in axes[knob]:
                if (lr, value) not in grid:
                    grid[(lr, value)] = runs.seeds(method, steps, [f"optim.lr={lr}", f"{knob}={value}"])
        means = {point: statistics.fmean(v) for point, v in grid.items()}
        best = min(means, key=means.get)
        grown = False
        for name, at in zip(axes, best, strict=True):
            side = axes[name]
            if len(side) < MAX_SIDE and at in (side[0], side[-1]):
                side.insert(0 if at == side[0] else len(side), neighbour(at, name, at == side[-1]))
                grown = True
        if not grown:
            break
    return {
        "knob": knob,
        "axes": axes,
        "grid": {f"{lr:g} {value:g}": v for (lr, value), v in grid.items()},
        "best": {"lr": best[0], knob: best[1]},
        "mean": means[best],
        "spread": (max(grid[best]) - min(grid[best])) / 2,  # half the range over the seeds
    }


def heat_maps(tuned: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(tuned), figsize=(4 * len(tuned), 3.6))
    for ax, (method, t) in zip(axes, tuned.items(), strict=True):
        lrs, values = t["axes"]["optim.lr"], t["axes"][t["knob"]]
        cells = np.array([[statistics.fmean(t["grid"][f"{lr:g} {v:g}"]) for v in values] for lr in lrs])
        image = ax.imshow(cells, cmap="viridis_r", aspect="auto")
        for i in range(len(lrs)):
            for j in range(len(values)):
                dark = cells[i, j] > (cells.min() + cells.max()) / 2  # white on the dark half of the map
                color = "w" if dark else "k"
                ax.text(j, i, f"{cells[i, j]:.0f}", ha="center", va="center", color=color, fontsize=8)
        ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel(t["knob"])
        ax.set_ylabel("optim.lr")
        ax.set_title(method)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"val ppl after {steps} steps (mean of 2 seeds), tiny LLaMA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def edge(t: dict, name: str, value: float) -> str:
    """A mark for a best that is still on its grid's edge once the side can grow no more."""
    side = t["axes"]["optim.lr" if name == "lr" else name]
    return " (edge)" if value in (side[0], side[-1]) else ""


def default_settings(steps: int, data_dir: str) -> dict:
    """The lr and scale LoQT's defaults give the recipe's model (config.MEASURED_DEFAULTS)."""
    cfg = load_config(None, recipe(steps, data_dir) + METHODS["loqt"][0])
    return {"lr": cfg.peak_lr(), "loqt.lora_alpha": cfg.lora_scale()}


def horizon_table(tuned: dict, ablations: dict, default: dict, steps: int) -> list[str]:
    full, galore = tuned["full"]["mean"], tuned["galore"]["mean"]
    lines = [
        f"{steps} steps ({steps * MICRO_BATCH * SEQ:,} tokens):",
        "| method | val ppl, 2 seeds | / full-rank | / GaLore | tuned at ((edge): on the grid's edge) |",
        "|---|---|---|---|---|",
    ]
    for name, t in tuned.items():
        at = ", ".join(f"{k} {v:g}" + edge(t, k, v) for k, v in t["best"].items())
        lines.append(
            f"| {name} | {t['mean']:.2f} ± {t['spread']:.2f} | {t['mean'] / full:.3f} | "
            f"{t['mean'] / galore:.3f} | {at} |"
        )
    loqt = tuned["loqt"]["mean"]
    at = ", ".join(f"{k} {v:g}" for k, v in default["at"].items())
    rows = {**{name: (values, "") for name, values in ablations.items()},
            "loqt at its defaults": (default["val_ppl"], f" (at {at})")}  # fmt: skip
    for name, (values, note) in rows.items():
        mean = statistics.fmean(values)
        lines.append(f"| {name} | {mean:.2f} ± {(max(values) - min(values)) / 2:.2f} | {mean / full:.3f} | "
                     f"{mean / galore:.3f} | / tuned LoQT {mean / loqt:.3f}{note} |")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short-steps", type=int, default=40)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--work", default="runs/bench_quality", help="the cache of finished runs (resumable)")
    ap.add_argument("--out", default="bench/results/quality.json")
    ap.add_argument("--heat-map", default="docs/quality_heatmap.png")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    runs, start = Runs(Path(args.work) / "runs.json", args.data_dir), time.perf_counter()
    horizons, lines = {}, []
    for steps in (args.short_steps, args.short_steps * args.factor):
        tuned = {method: tune(runs, method, steps, args.lrs) for method in METHODS}
        best = tuned["loqt"]["best"]
        at_best = [f"optim.lr={best['lr']}", f"loqt.lora_alpha={best['loqt.lora_alpha']}"]
        ablations = {name: runs.seeds("loqt", steps, [*at_best, *extra]) for name, extra in ABLATIONS.items()}
        default = {"val_ppl": runs.seeds("loqt", steps, []), "at": default_settings(steps, args.data_dir)}
        horizons[str(steps)] = {"tuned": tuned, "ablations": ablations, "loqt_default": default}
        lines += [*horizon_table(tuned, ablations, default, steps), ""]
        print("\n".join(lines), file=sys.stderr, flush=True)
    long = horizons[str(args.short_steps * args.factor)]
    heat_maps(long["tuned"], args.short_steps * args.factor, Path(args.heat_map))
    loqt, galore, full = (long["tuned"][m]["mean"] for m in ("loqt", "galore", "full"))
    result = {
        "settings": {"short_steps": args.short_steps, "factor": args.factor, "lrs": args.lrs, "seeds": SEEDS,
                     "max_side": MAX_SIDE,
                     "recipe": recipe(args.short_steps * args.factor, "data"),
                     "knobs": {m: [k, list(v)] for m, (_, k, v) in METHODS.items()}},
        "wall_s": time.perf_counter() - start,
        "horizons": horizons,
        "targets": {"loqt_over_galore": loqt / galore, "loqt_over_full": loqt / full,
                    "default_over_tuned_loqt": statistics.fmean(long["loqt_default"]["val_ppl"]) / loqt},
        "table": lines,
    }  # fmt: skip
    print("\n".join(lines))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
