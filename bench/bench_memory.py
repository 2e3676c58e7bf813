"""Measured training memory against `loqt-ray memory`'s estimate, refresh steps included.

Each case runs in a fresh process: the real Trainer and engine on the CPU, a few optimizer
steps of a paper shape (130m, 350m) at a short sequence, merges every 2 steps and a refresh at
steps 0, 2 and 4; per-layer updates (the plain engine) unless a case says DeepSpeed. A thread
samples the process's resident set (/proc/self/statm) every 2 ms; glibc is told to serve every
allocation over 64 KiB by mmap, so freed tensors leave the resident set and each step's peak is
what that step held. Reported per case:

  measured   peak RSS of steps 1-5 minus the baseline: the RSS right after building the Trainer
             less the bytes of the tensors it built (so the libraries and code that building
             loads count as the process's, like a CUDA context on a GPU, and the model's
             tensors count as the run's)
  estimate   trainer_estimate(cfg).peak (refresh steps included)
  refresh/steady  the peak of the later refresh steps (2, 4) over the peak of steady steps (1, 3, 5)

Building and step 0 are reported apart: they also hold the model's fp32 weights (built dense,
then quantized; kept until step 0's compensation), which on a GPU stay in host memory, not in
the device memory the estimate describes.

    python bench/bench_memory.py                 # writes bench/results/memory.json
    python bench/bench_memory.py --reestimate    # the estimates again (after an estimator change)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from recipe import write_result

CASES = {
    "130m exact, AdamW": ["model.size=130m", "loqt.refresh=exact", "optim.name=adamw"],
    "130m layerwise, AdamW": ["model.size=130m", "loqt.refresh=layerwise", "optim.name=adamw"],
    "130m layerwise, 8-bit Adam, bf16 16-bit mode": [
        "model.size=130m",
        "loqt.refresh=layerwise",
        "optim.name=adam8bit",
        "train.dtype=bfloat16",
        "train.master_weights=false",
    ],
    "130m layerwise, AdamW, DeepSpeed ZeRO-2": [
        "model.size=130m",
        "loqt.refresh=layerwise",
        "optim.name=adamw",
        "optim.per_layer=false",
    ],
    "350m exact, AdamW": ["model.size=350m", "loqt.refresh=exact", "optim.name=adamw"],
    "350m layerwise, AdamW": ["model.size=350m", "loqt.refresh=layerwise", "optim.name=adamw"],
    "130m offload, accumulation 2, per-layer AdamW": [
        "model.size=130m", "loqt.refresh=offload", "train.grad_accum=2", "optim.name=adamw",
    ],
    "130m offload, accumulation 2, AdamW, DeepSpeed ZeRO-2, activation checkpointing": [
        "model.size=130m", "loqt.refresh=offload", "train.grad_accum=2", "optim.name=adamw",
        "optim.per_layer=false", "train.activation_checkpointing=true",
    ],
    "130m layerwise, per-layer AdamW, 16 x 256 tokens": [
        "model.size=130m", "loqt.refresh=layerwise", "optim.name=adamw", "data.seq_len=256",
        "train.micro_batch_size=16",
    ],
    "130m layerwise, per-layer AdamW, 16 x 256 tokens, activation checkpointing": [
        "model.size=130m", "loqt.refresh=layerwise", "optim.name=adamw", "data.seq_len=256",
        "train.micro_batch_size=16", "train.activation_checkpointing=true",
    ],
}  # fmt: skip
COMMON = [
    "loqt.rank=128",
    "loqt.schedule=static",
    "loqt.update_interval=2",
    "optim.per_layer=true",
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.steps=6",
    "train.eval_tokens=256",
]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def take(self) -> int:
        """The peak since the last take, restarting from the current resident set."""
        peak, self.peak = max(self.peak, rss()), rss()
        return peak


def run_case(overrides: list[str]) -> dict:
    """In this (fresh) process: build, train the steps, report the per-step peaks."""
    import torch

    from loqt_ray.config import load_config
    from loqt_ray.data import prepare
    from loqt_ray.engine import tensor_bytes
    from loqt_ray.memory import GIB
    from loqt_ray.trainer import Trainer

    torch.set_num_threads(2)
    cfg = load_config(None, overrides)
    prepare(cfg.data)  # cached by the parent; mapped here before the baseline
    sampler = PeakSampler()
    before = rss()
    sampler.start()
    trainer = Trainer(cfg)
    peaks = [sampler.take()]  # building
    built = tensor_bytes(trainer.model.state_dict().values())
    built += tensor_bytes(
        layer.initial_weight for layer in trainer.layers if layer.initial_weight is not None
    )
    baseline = rss() - built
    step_s = []
    for _ in range(cfg.train.steps):
        start = time.perf_counter()
        trainer.train_step()
        step_s.append(time.perf_counter() - start)
        peaks.append(sampler.take())
    sampler.running = False
    per_step = [p - baseline for p in peaks[1:]]
    steady = max(per_step[i] for i in (1, 3, 5))
    refresh = max(per_step[i] for i in (2, 4))
    return {
        "code_loaded_by_building_gib": (baseline - before) / GIB,
        "build_gib": (peaks[0] - baseline) / GIB,
        "measured_gib": max(per_step[1:]) / GIB,
        "steady_gib": steady / GIB,
        "refresh_gib": refresh / GIB,
        "refresh_over_steady": refresh / steady,
        "per_step_gib": [p / GIB for p in per_step],
        "step_s": step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/memory.json")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child process's entry point
    ap.add_argument("--only", action="append", help="run only the cases whose name contains this")
    ap.add_argument("--reestimate", action="store_true", help="recompute the estimates in --out, run nothing")
    args = ap.parse_args()
    common = [*COMMON, f"data.data_dir={args.data_dir}"]
    if args.reestimate:
        write_results(Path(args.out), common, json.loads(Path(args.out).read_text())["rows"])
        return
    if args.case:
        print(json.dumps(run_case(common + CASES[args.case])))
        return
    from loqt_ray.config import load_config
    from loqt_ray.data import prepare

    prepare(load_config(None, common).data)  # once, before the cases map it
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": "2",
    }
    rows = {}  # with --only, the other cases' rows stay as the last run measured them
    if args.only and Path(args.out).exists():
        rows = {k: v for k, v in json.loads(Path(args.out).read_text())["rows"].items() if k in CASES}
    for name in CASES:
        if args.only and not any(part in name for part in args.only):
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--case", name, "--data-dir", args.data_dir],
            env=env,
            capture_output=True,
            text=True,
            timeout=3000,
        )
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr)
    write_results(Path(args.out), common, rows)


def with_estimate(row: dict, cfg) -> dict:
    """The row's estimate columns from the estimator as it is now (they depend on the config only)."""
    from loqt_ray.memory import GIB, trainer_estimate

    estimate = trainer_estimate(cfg)
    return {
        **row,
        "engine": estimate.engine,
        "estimate_gib": estimate.peak / GIB,
        "estimate_steady_gib": estimate.steady / GIB,
        "measured_over_estimate": row["measured_gib"] * GIB / estimate.peak,
    }


def write_results(out: Path, common: list[str], rows: dict) -> None:
    from loqt_ray.config import load_config

    rows = {name: with_estimate(row, load_config(None, common + CASES[name])) for name, row in rows.items()}
    table = [
        "| case | measured peak GiB | estimate GiB | measured / estimate | refresh-step / steady-step peak |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        table.append(
            f"| {name} | {r['measured_gib']:.3f} | {r['estimate_gib']:.3f} | "
            f"{r['measured_over_estimate']:.2f} | {r['refresh_over_steady']:.2f} |"
        )
    print("\n".join(table))
    measured = f"{os.cpu_count()} cores, RSS high-water over the pre-model baseline"
    write_result(out, {"settings": common, "measured": measured, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
