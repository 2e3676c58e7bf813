"""A sweep's trials from their own files: one row each (status, tokens, val ppl, settings, curve),
best first, and the leaderboard as markdown. No Ray: the sweep run, the export and the report all
read trials through this module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .rundir import CONFIG_FILE, TRIAL_RUN, read_metrics


def _trial_id(trial_dir: Path) -> str:
    # Tune names trials <trainable>_<id>_<index>_..., the id 8 hex digits (a searcher's trials) or
    # 5 hex digits and a 5-digit number (a grid's); the display and the leaderboard use the same id.
    match = re.search(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+_", trial_dir.name)
    return match.group(1) if match else trial_dir.name


def _trial_row(config_path: Path) -> dict:
    run, trial_dir = config_path.parent, config_path.parent.parent
    logged = read_metrics(run)
    evals = [m for m in logged if "val_ppl" in m]
    cfg = yaml.safe_load(config_path.read_text())
    finished = bool(evals) and evals[-1]["step"] == cfg["train"]["steps"]
    failed = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
    params_file = trial_dir / "params.json"
    return {
        "trial": _trial_id(trial_dir),
        "dir": str(trial_dir),
        "status": "failed" if failed else "completed" if finished else "stopped early",
        "tokens": evals[-1]["tokens"] if evals else 0,
        "val_ppl": evals[-1]["val_ppl"] if evals else float("inf"),
        "curve": [(m["tokens"], m["val_ppl"]) for m in evals],
        # the cost side: the run's peak memory (GiB) and its training tokens/s, as last logged
        "memory_gib": logged[-1]["memory_mb"] / 1024 if logged and "memory_mb" in logged[-1] else None,
        "tokens_per_s": logged[-1].get("tokens_per_s") if logged else None,
        "params": json.loads(params_file.read_text()) if params_file.exists() else {},
        "config": cfg,
    }


def leaderboard(sweep_dir: Path) -> list[dict]:
    """One row per trial from its own files, best validation perplexity first, failed last."""
    rows = [_trial_row(path) for path in sorted(Path(sweep_dir).glob(f"*/{TRIAL_RUN}/{CONFIG_FILE}"))]
    return sorted(rows, key=lambda r: (r["status"] == "failed", r["val_ppl"]))


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def leaderboard_markdown(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    lines = [
        "| trial | status | tokens | val ppl | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        values = " | ".join(format_value(r["params"].get(k, "")) for k in keys)
        lines.append(f"| {r['trial']} | {r['status']} | {r['tokens']:,} | {r['val_ppl']:.2f} | {values} |")
    return "\n".join(lines) + "\n"
