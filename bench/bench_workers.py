"""Tokens/s of the same LoQT run on 1 and on 2 Ray Train workers (DeepSpeed ZeRO-2, gloo on CPU).

The global batch is the same in both (2 workers x micro-batch 4 vs 1 worker x 8), so the
runs see the same number of tokens per step; both use all of this machine's cores.

    .venv/bin/python bench/bench_workers.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from loqt_ray.config import load_config
from loqt_ray.launch import run_training

CORES = os.cpu_count() or 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="bench/results/workers.json")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    rows = []
    for workers in (1, 2):
        cfg = load_config(
            "jobs/demo.yaml",
            [
                f"train.name=w{workers}",
                f"train.output_dir={out}",
                f"train.steps={args.steps}",
                f"train.micro_batch_size={8 // workers}",
                f"train.eval_every={args.steps}",
                "train.eval_tokens=8192",
                f"scale.num_workers={workers}",
                f"scale.cpus_per_worker={CORES / workers * 0.9:.2f}",
                "scale.zero_stage=2",
            ],
        )
        final = run_training(cfg, progress=False)
        rows.append({"workers": workers, "tokens_per_s": final["tokens_per_s"], "val_ppl": final["val_ppl"]})
    shutil.rmtree(out)
    table = ["| workers | tokens/s | ratio to 1 worker | val ppl |", "|---|---|---|---|"]
    table += [
        f"| {r['workers']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} | "
        f"{r['val_ppl']:.1f} |"
        for r in rows
    ]
    print("\n".join(table))
    Path(args.out).write_text(
        json.dumps({"cores": CORES, "steps": args.steps, "rows": rows, "table": table}, indent=1)
    )


if __name__ == "__main__":
    main()
