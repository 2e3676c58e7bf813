"""Run and sweep directories: their file names, metrics reading and the sweep leaderboard.

A run directory (`train.output_dir/train.name`) holds
    config.yaml      the config the run was (last) started with
    metrics.jsonl    one JSON object per logged step, written by rank 0, each step once
    tokenizer/       the tokenizer it trained with (export-hf needs nothing else)
    tensorboard/     TensorBoard events
    workers.jsonl    where each worker ran, one line per rank per (re)start
    ray.log          Ray's own console output while the run worked
    checkpoint_*/    checkpoints (checkpoint.py)
A sweep directory (`sweep.storage_path/sweep.name`) holds sweep.yaml (as run),
search_space.yaml, ray.log, one Tune directory per trial with its run in `train/`,
leaderboard.md, best.yaml and report/.

No Ray here: sweep.py and report.py both read results through this module.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from .config import Config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
TENSORBOARD_DIR = "tensorboard"
WORKERS_FILE = "workers.jsonl"
RAY_LOG = "ray.log"  # Ray's (and Tune's, Optuna's) own console output while a run or sweep works
TRIAL_RUN = "train"  # the run inside each trial directory
SWEEP_FILE = "sweep.yaml"
SPACE_FILE = "search_space.yaml"
LEADERBOARD_FILE = "leaderboard.md"
BEST_FILE = "best.yaml"
REPORT_DIR = "report"


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir).resolve() / cfg.train.name


def _replace_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a process killed mid-write leaves the previous
    file whole, never an empty or cut-short one (a rerun reads config.yaml and metrics.jsonl first)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_config(out: Path, cfg: Config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _replace_text(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def start_run(out: Path, cfg: Config, tokenizer) -> None:
    """The files a run directory starts with: its config and the tokenizer (so export-hf needs
    nothing else)."""
    write_config(out, cfg)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))


def read_config(out: Path) -> dict:
    return yaml.safe_load((out / CONFIG_FILE).read_text())


def _jsonl_rows(text: str) -> list[dict]:
    # the piece after the last newline is empty, or a line a kill or a full disk cut short: not a row
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _read_jsonl(path: Path) -> list[dict]:
    return _jsonl_rows(path.read_text()) if path.exists() else []


def read_metrics(out: Path) -> list[dict]:
    return _read_jsonl(Path(out) / METRICS_FILE)


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the rows after `step` (a run restarted from that step's checkpoint logs them again) and
    a last line cut short (the rows appended next would join it into one unreadable line)."""
    path = Path(out) / METRICS_FILE
    text = path.read_text() if path.exists() else ""
    rows = _jsonl_rows(text)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) != len(rows) or (text and not text.endswith("\n")):
        _replace_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def record_workers(out: Path, workers: list[dict]) -> None:
    """Where each rank runs, one line per rank, added at each (re)start of the worker group (by
    rank 0; the file rewritten whole, without a line a kill cut short)."""
    start = time.time()  # one value for the whole group: readers tell the group's starts apart by it
    rows = read_workers(out) + [{**w, "time": start} for w in workers]
    _replace_text(Path(out) / WORKERS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def read_workers(out: Path) -> list[dict]:
    return _read_jsonl(Path(out) / WORKERS_FILE)


def _trial_id(trial_dir: Path) -> str:
    # Tune names trials <trainable>_<id>_<index>_..., the id 8 hex digits (a searcher's trials) or
    # 5 hex digits and a 5-digit number (a grid's); the display and the leaderboard use the same id.
    match = re.search(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+_", trial_dir.name)
    return match.group(1) if match else trial_dir.name


def _trial_row(config_path: Path) -> dict:
    run, trial_dir = config_path.parent, config_path.parent.parent
    evals = [m for m in read_metrics(run) if "val_ppl" in m]
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
