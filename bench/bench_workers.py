"""Tokens/s of the same LoQT run in one plain process and on 1 and 2 Ray Train workers (DeepSpeed
ZeRO-2, gloo on CPU), by the trainer's step timer and by the wall clock between logged steps.

The global batch is the same in all (2 workers x micro-batch 4 vs 1 x 8), so the runs see the same
tokens per step; all use this machine's cores. Every step is logged (--log-every 1): the wall-clock
column shows what the step timer leaves out (evaluations, checkpoints, reporting to Ray).

    .venv/bin/python bench/bench_workers.py [--steps 60] [--log-every 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from recipe import write_result

from loqt_ray.config import load_config
from loqt_ray.engine import PlainEngine
from loqt_ray.launch import run_training
from loqt_ray.rundir import read_metrics
from loqt_ray.sink import Collect
from loqt_ray.trainer import Trainer

CORES = os.cpu_count() or 2


class TimedRows(Collect):
    """Every logged step with the wall-clock time it was logged, as metrics.jsonl holds it."""

    def log(self, metrics: dict) -> None:
        super().log({**metrics, "time": time.time()})


def wall_tokens_per_s(rows: list[dict]) -> float:
    """Tokens over wall-clock seconds from the first logged step to the last."""
    return (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["time"] - rows[0]["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--out", default="bench/results/workers.json")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-workers-"))

    def config(name: str, workers: int):
        return load_config(
            "jobs/demo.yaml",
            [
                f"train.name={name}",
                f"train.output_dir={out}",
                f"train.steps={args.steps}",
                f"train.log_every={args.log_every}",
                f"train.micro_batch_size={8 // workers}",
                f"train.eval_every={args.steps}",
                "train.eval_tokens=8192",
                f"scale.num_workers={workers}",
                f"scale.cpus_per_worker={CORES / workers * 0.9:.2f}",
                "scale.zero_stage=2",
            ],
        )

    rows = []
    logged: list[dict] = []
    torch.set_num_threads(CORES)
    final = Trainer(config("plain", 1), make_engine=PlainEngine).train(TimedRows(logged))
    rows.append({"run": "one process, plain torch loop", "tokens_per_s": final["tokens_per_s"],
                 "wall_tokens_per_s": wall_tokens_per_s(logged), "val_ppl": final["val_ppl"]})  # fmt: skip
    for workers in (1, 2):
        final = run_training(config(f"w{workers}", workers), progress=False)
        rows.append({"run": f"Ray Train, {workers} worker(s)", "tokens_per_s": final["tokens_per_s"],
                     "wall_tokens_per_s": wall_tokens_per_s(read_metrics(out / f"w{workers}")),
                     "val_ppl": final["val_ppl"]})  # fmt: skip
    shutil.rmtree(out)
    base = rows[0]["wall_tokens_per_s"]
    table = ["| run | tokens/s (step timer) | tokens/s (wall clock) | wall ratio to one process | val ppl |",
             "|---|---|---|---|---|"]  # fmt: skip
    table += [
        f"| {r['run']} | {r['tokens_per_s']:.0f} | {r['wall_tokens_per_s']:.0f} | "
        f"{r['wall_tokens_per_s'] / base:.2f} | {r['val_ppl']:.1f} |"
        for r in rows
    ]
    print("\n".join(table))
    settings = {"cores": CORES, "steps": args.steps, "log_every": args.log_every}
    write_result(args.out, {**settings, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
