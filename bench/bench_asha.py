"""The same sweep with ASHA early stopping and without it (same Optuna seed): best val ppl and tokens.

TPE's first 10 proposals come from its seeded start-up sampler, so with up to 10
trials both sweeps try exactly the same settings; the comparison shows what ASHA
saves and whether it stopped the eventual winner.

    .venv/bin/python bench/bench_asha.py [--sweep jobs/sweep.yaml] [--num-samples 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from loqt_ray.results import leaderboard
from loqt_ray.sweep import run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="jobs/sweep.yaml")
    ap.add_argument("--num-samples", type=int, default=6)
    ap.add_argument("--out", default="bench/results/asha.json")
    args = ap.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="bench-asha-"))
    runs = {}
    for label, enabled in (("no early stopping", "false"), ("ASHA", "true")):
        start = time.time()
        sweep_dir = run_sweep(
            args.sweep,
            [
                f"sweep.name=asha-{enabled}",
                f"sweep.storage_path={storage}",
                f"sweep.num_samples={args.num_samples}",
                f"asha.enabled={enabled}",
            ],
        )
        rows = leaderboard(sweep_dir)
        runs[label] = {
            "wall_s": round(time.time() - start),
            "best_val_ppl": rows[0]["val_ppl"],
            "best_params": rows[0]["params"],
            "tokens": sum(r["tokens"] for r in rows),
            "stopped": sum(r["status"] == "stopped early" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "trials": len(rows),
        }
    shutil.rmtree(storage)
    base = runs["no early stopping"]
    table = [
        "| sweep | trials (stopped early) | best val ppl | ppl / no stopping | tokens trained | "
        "tokens / no stopping | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {label} | {r['trials']} ({r['stopped']}) | {r['best_val_ppl']:.2f} | "
        f"{r['best_val_ppl'] / base['best_val_ppl']:.3f} | {r['tokens']:,} | "
        f"{r['tokens'] / base['tokens']:.2f} | "
        f"{r['wall_s'] / 60:.1f} min |"
        for label, r in runs.items()
    ]
    same_winner = runs["ASHA"]["best_params"] == base["best_params"]
    print("\n".join(table))
    print(f"same best settings in both sweeps: {same_winner}")
    Path(args.out).write_text(
        json.dumps(
            {
                "sweep": args.sweep,
                "num_samples": args.num_samples,
                "runs": runs,
                "same_winner": same_winner,
                "table": table,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
