"""What the GPU check's sweep shows: each trial's CUDA device, tokens/s and peak memory, and whether
the two trials trained at once (their workers' starts against their last reports to Tune).

    python bench/gpu_sweep.py SWEEP_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loqt_ray.leaderboard import leaderboard
from loqt_ray.rundir import read_metrics, read_workers


def main() -> None:
    sweep_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    trials, spans = {}, []
    for row in leaderboard(sweep_dir):
        run = Path(row["dir"]) / "train"
        workers, metrics = read_workers(run), read_metrics(run)
        results = (Path(row["dir"]) / "result.json").read_text().splitlines()
        start, end = workers[0]["time"], json.loads(results[-1])["timestamp"] if results else None
        spans.append((start, end))
        trials[row["trial"]] = {
            "status": row["status"], "val_ppl": row["val_ppl"], "gpu": workers[0].get("gpu"),
            "cuda_visible_devices": workers[0].get("cuda_visible_devices"),
            "tokens_per_s": metrics[-1]["tokens_per_s"] if metrics else None,
            "peak_gib": metrics[-1]["memory_mb"] / 1024 if metrics else None, "span": [start, end],
        }  # fmt: skip
    at_once = (
        len(spans) == 2
        and all(spans[i][1] for i in (0, 1))
        and max(s for s, _ in spans) < min(e for _, e in spans)
    )
    result = {"trials": trials, "both_at_once": at_once}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
