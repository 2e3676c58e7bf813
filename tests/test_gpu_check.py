"""bench/gpu_check.sh --cpu: the GPU check's every step, on the CPU at tiny sizes, so the script
the GPU machine runs in its one short call cannot rot between GPU runs."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a loaded 2-core machine: the script's own limit with --cpu is 1020 s
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bench/gpu_check.sh", "--cpu"], cwd=ROOT, env={**os.environ, "OUT": str(out)},
        capture_output=True, text=True, timeout=1100, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["mode"] == "cpu"
    steps = results["steps"]
    assert list(steps) == [
        "env",
        "cuda_tests",
        "train_60m",
        "profile",
        "train_1b",
        "train_7b",
        "checkpointing_7b",
        "svd",
        "graphs",
    ]
    assert all(step["status"] == "ok" for step in steps.values()), steps
    assert "skipped" in steps["cuda_tests"]["result"]["summary"]  # no CUDA here: they skip, not fail
    speed = steps["train_60m"]["result"]
    assert speed["loqt"]["tokens_per_s"] > 0 and speed["loqt"]["updates_after_step_0"] == 1
    assert speed["loqt_over_full_tokens_per_s"] > 0
    # train.cuda_graphs' replay logic, the eager loss standing in for the recording: of 8 steps all
    # but the first two replay, refresh steps (0, 4) included: their gradient pass is its own
    assert speed["loqt_graphs"]["graph_replays"] == speed["full_graphs"]["graph_replays"] == 6
    assert speed["loqt_graphs"]["graphs_off"] is None and speed["loqt_graphs"]["updates_after_step_0"] == 1
    assert speed["graphs_loqt_over_full_tokens_per_s"] > 0 and speed["graphs_loqt_over_eager_full"] > 0
    big = steps["train_1b"]["result"]
    assert big["loqt_largest"]["recommended_micro_batch"] >= 1 and big["loqt_over_full_tokens_per_s"] > 0
    assert big["full"]["micro_batch"] == big["loqt"]["micro_batch"]  # speed compared at one micro-batch
    big = steps["train_7b"]["result"]  # the job's real batch: accumulation, checkpointing, offload
    assert (
        big["tokens_per_step"] == 2 * 3 * 64 and big["updates_after_step_0"] == 0 and big["tokens_per_s"] > 0
    )
    checkpointing = steps["checkpointing_7b"]["result"]
    assert checkpointing["on_over_off"] > 0 and checkpointing["micro_batch"] == 2
    deficient = steps["svd"]["result"]["tiny_16_tokens"]  # a gradient of rank 16, rank 32 asked
    assert deficient["tokens"] == 16 and deficient["trainer"]["subspace_kept"] == pytest.approx(1, abs=1e-4)
    svd = steps["svd"]["result"]["tiny"]
    assert svd["svd"]["subspace_kept"] == pytest.approx(1, abs=1e-4)  # against itself
    assert svd["trainer"]["subspace_kept"] == pytest.approx(1, abs=1e-4)  # the CPU's is the default driver
    assert 0 < svd["svd_lowrank"]["subspace_kept"] <= 1 + 1e-4 and svd["gram_eigh"]["seconds"] > 0
    tables = (out / "profile.txt").read_text()
    assert "aten::mm" in tables and "sorted by self_cpu_time_total" in tables  # host time: on the CPU, all
    assert "nano full, micro-batch" in tables and "nano loqt, micro-batch" in tables
    profile = steps["profile"]["result"]
    assert profile["loqt"]["step_ms"] > 0 and profile["full"]["profiled_host_ms"] > 0
    graphs = steps["graphs"]["result"]
    assert graphs["eager_loqt_over_full"] > 0 and "graphed_loqt_over_full" not in graphs  # no graphs on a CPU
    assert "| train_60m | ok |" in proc.stdout  # the summary table
    assert len(list(out.iterdir())) <= 8  # what comes back from the GPU machine


def test_the_gpu_sweep_file_plans_two_trials_sharing_one_gpu():
    """bench/gpu_sweep.sh --cpu: the fractional-GPU sweep the GPU machine runs is valid as shipped."""
    proc = subprocess.run(
        ["bench/gpu_sweep.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 at a time: 8.02 CPU + 1 GPU" in proc.stdout and "dry run: nothing started" in proc.stdout
