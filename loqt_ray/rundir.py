"""Run and sweep directories: their file names, and the run files other than checkpoints.

A run directory (`train.output_dir/train.name`) holds
    config.yaml      the config the run was (last) started with
    metrics.jsonl    one JSON object per logged step, written by rank 0, each step once
    tokenizer/       the tokenizer it trained with (export-hf needs nothing else)
    tensorboard/     TensorBoard events
    workers.jsonl    where each worker ran, one line per rank per (re)start
    ray.log          Ray's own console output while the run worked
    checkpoint_*/    checkpoints (checkpoint.py)
A sweep directory (`sweep.storage_path/sweep.name`) holds sweep.yaml (as run), search_space.yaml,
optuna.journal (the Optuna study), mlflow.db and wandb/ (trackers), ray.log, one Tune directory
per trial with its run in `train/`, leaderboard.md, best.yaml and report/.

checkpoint.py owns the checkpoint_* directories and Ray's record of them; everything else in a
run directory is written and read here. No Ray.
"""

from __future__ import annotations

import json
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
MLFLOW_DB = "mlflow.db"  # MLflow's runs of a sweep's trials, unless MLFLOW_TRACKING_URI names a server
OPTUNA_JOURNAL = "optuna.journal"  # the sweep's Optuna study (its name is the sweep's), Optuna's own storage
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


class MetricsLog:
    """metrics.jsonl and TensorBoard events, written by rank 0 only. Opened at a (re)start, it first
    drops any logged step past `resumed_step`: the group goes on from there and logs them again."""

    def __init__(self, out: Path, rank: int, resumed_step: int):
        self.enabled = rank == 0
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        truncate_metrics(out, resumed_step)
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))
        self.file = open(out / METRICS_FILE, "a")

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        # with the wall-clock time it was logged: tokens_per_s counts training steps only, the times
        # show the rest (evaluations, checkpoints, Ray) as well
        self.file.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.file.close()
