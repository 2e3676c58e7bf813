import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loqt_ray.cli import main
from loqt_ray.config import ConfigError, load_config
from loqt_ray.leaderboard import leaderboard
from loqt_ray.rundir import read_workers
from loqt_ray.search_space import check_space, parse_space

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("space", ["cpu_tiny", "gpu_60m", "gpu_350m"])
def test_shipped_spaces_are_valid_for_their_models(space):
    size = {"cpu_tiny": "tiny", "gpu_60m": "60m", "gpu_350m": "350m"}[space]
    path = ROOT / "search_spaces" / f"{space}.yaml"
    check_space(parse_space(path), {"model": {"size": size}}, path)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"loqt.rank": {"choice": []}}, "params.loqt.rank: choice needs a non-empty list"),
        ({"loqt.rank": {"normal": [1, 2]}}, "params.loqt.rank: must be one of"),
        ({"optim.lr": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
        ({"optim.lr": {"uniform": [0.1, 0.01]}}, "low < high"),
        ({"loqt.rank": {"choice": [8, 256]}}, "rank 256 does not fit the tiny model"),
        ({"loqt.quant_block_size": {"choice": [64, 48]}}, "params.loqt.quant_block_size: must be one of 32"),
        (
            {"loqt.update_interval": {"choice": [20, 30]}, "loqt.refresh_interval": {"choice": [40]}},
            "params.loqt.refresh_interval: must be a multiple",
        ),
        ({"loqt.rnak": {"choice": [8]}}, "params.loqt.rnak: unknown key"),
        ({"optim.lr": {"grid": []}}, "params.optim.lr: grid needs a non-empty list"),
        ({"optim.lr": {"grid": [0.01, 0.01]}}, "params.optim.lr: grid lists a value twice"),
        ({"loqt.rank": {"grid": [8, 16, 256]}}, "rank 256 does not fit the tiny model"),
        ({"optim.lr": {"grid": [0.01, "fast"]}}, "params.optim.lr: must be a number"),
    ],
)
def test_bad_search_spaces_are_refused_before_any_trial(tmp_path, params, message):
    path = write(tmp_path, "space.yaml", {"params": params})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        check_space(parse_space(path), {"model": {"size": "tiny"}}, path)


def test_sweep_file_errors_exit_2_before_a_cluster_starts(tmp_path, capsys):
    bad = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    bad["sweep"]["search_space"] = str(ROOT / "search_spaces" / "cpu_tiny.yaml")
    bad["production"]["model"] = {"size": "2b"}
    path = write(tmp_path, "sweep.yaml", bad)
    assert main(["sweep", str(path), "--set", f"sweep.storage_path={tmp_path}/s"]) == 2
    assert "production.model.size" in capsys.readouterr().err
    assert main(["sweep", str(path), "--set", "asha.reduction_factor=1"]) == 2
    assert not (tmp_path / "s").exists()
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "best.yaml")]) == 2
    assert main(["report", str(tmp_path)]) == 2 and "no trial has started yet" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_runs_stops_exports_and_resumes(tmp_path, data_dir, capfd):
    """A real sweep: local Ray, a grid beside sampled values, ASHA, 4 trials of 1 DeepSpeed worker each.
    (Optuna's TPE, used when a space has no grid, runs in test_cluster's sweep job.)"""
    import optuna
    import ray

    from loqt_ray.ray_session import start_local_ray
    from loqt_ray.sweep_plan import study_storage

    # A grid of a useful and a useless lr, twice: at least one useless trial must be stopped at the
    # first rung, since it cannot beat a useful one that already reported there.
    space = write(
        tmp_path,
        "space.yaml",
        {"params": {"optim.lr": {"grid": [1e-2, 1e-5]}, "loqt.rank": {"choice": [8, 16]},
                    "loqt.lora_alpha": {"uniform": [0.25, 1.0]}}},
    )  # fmt: skip
    spec = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    spec["sweep"].update(
        name="t",
        storage_path=str(tmp_path / "sweeps"),
        num_samples=2,
        tokens_per_trial=8 * 64 * 96,
        eval_every_tokens=8 * 64 * 24,
        search_space=str(space),
        loggers=["tensorboard", "wandb", "mlflow"],
    )
    spec["asha"]["grace_period_tokens"] = 8 * 64 * 24
    spec["trial"]["model"] = {"size": "nano"}
    spec["trial"]["data"] = {"data_dir": data_dir, "vocab_size": 2048, "seq_len": 64}
    spec["trial"]["train"] = {"micro_batch_size": 8, "eval_tokens": 2048}
    # Each trial asks for 0.5 of the one GPU this local Ray declares (Ray's GPU logic without a GPU:
    # the workers say so and train on the CPU), so two run at a time.
    spec["trial"]["scale"].update(cpus_per_worker=0.5, use_gpu=True, gpus_per_worker=0.5)
    path = write(tmp_path, "sweep.yaml", spec)
    start_local_ray(num_cpus=2, num_gpus=1)
    try:
        assert main(["sweep", str(path)]) == 0
        sweep_dir = tmp_path / "sweeps" / "t"
        rows = leaderboard(sweep_dir)
        # The live display: the plan at once, a status line and a line per trial that ended; Ray's
        # own banners and warnings went to ray.log instead of the console.
        console = capfd.readouterr().err
        plan = console.index("t: 4 trials of 49,152 tokens, 2 at a time, ASHA from 12,288 tokens")
        assert plan < console.index("t: starting Ray") < console.index(" of 4 trials |")  # the plan first
        assert "of 4 trials |" in console and "best val ppl" in console
        stopped = [r for r in rows if r["status"] == "stopped early"]
        for r in rows:
            ended = "stopped early by ASHA at" if r in stopped else "completed: val ppl"
            assert f"trial {r['trial']} {ended}" in console
        assert "Configuration for experiment" not in console
        assert "Configuration for experiment" in (sweep_dir / "ray.log").read_text()
        # From the workers' own clocks: when each trial's worker group started (workers.jsonl) and
        # when its last report reached Tune (result.json): never more than two at once, and two.
        spans = []
        for r in rows:
            start = read_workers(Path(r["dir"]) / "train")[0]["time"]
            end = json.loads(Path(r["dir"], "result.json").read_text().splitlines()[-1])["timestamp"]
            spans.append((start, end))
        overlaps = [sum(a <= t < b for a, b in spans) for t, _ in spans]
        assert max(overlaps) == 2, spans
        assert len(rows) == 4 and all(r["status"] in ("completed", "stopped early") for r in rows)
        assert sorted(r["params"]["optim.lr"] for r in rows) == [1e-5, 1e-5, 1e-2, 1e-2]
        # Async ASHA may also stop a useful trial that reached a rung behind a better one; a useless
        # one must go, and the best must be useful.
        assert any(r["params"]["optim.lr"] == 1e-5 for r in stopped)
        assert all(r["tokens"] < 8 * 64 * 96 for r in stopped)
        assert rows[0]["params"]["optim.lr"] == 1e-2
        assert all(0 < r["tokens"] <= 8 * 64 * 96 for r in rows)
        assert rows[0]["val_ppl"] == min(r["val_ppl"] for r in rows)
        assert "| trial | status | tokens | val ppl |" in (sweep_dir / "leaderboard.md").read_text()

        # The trackers, through Ray Tune's own callbacks, offline into the sweep directory: a W&B
        # run and an MLflow run per trial with its settings and metrics, TensorBoard events.
        ids = {r["trial"] for r in rows}
        offline = list((sweep_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert {path.stem.removeprefix("run-") for path in offline} == ids
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        assert len(runs) == 4 and all("val_ppl" in run.data.metrics for run in runs)
        assert {run.data.params["optim.lr"] for run in runs} == {"0.01", "1e-05"}
        assert all(list(Path(r["dir"]).glob("events.out.tfevents.*")) for r in rows)

        best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
        assert best["provenance"]["trial"] == rows[0]["trial"] and best["model"]["size"] == "60m"
        assert best["loqt"]["rank"] == rows[0]["params"]["loqt.rank"]
        cfg = load_config(sweep_dir / "best.yaml")  # `loqt-ray train --config best.yaml` accepts it as is
        assert cfg.train.steps == 10000 and cfg.scale.use_gpu

        # The report: plots and a summary from the sweep directory's files alone.
        summary = (sweep_dir / "report" / "summary.md").read_text()
        assert f"Best: trial {rows[0]['trial']}" in summary and "Parameter importances (PED-ANOVA" in summary
        for png in ("val_ppl", "tradeoff", "lr_scale", "importances", "parallel_coordinates"):
            assert (sweep_dir / "report" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert main(["report", str(sweep_dir), "-o", str(tmp_path / "r")]) == 0
        assert (tmp_path / "r" / "summary.md").read_text() == summary

        # Rerunning resumes: finished trials are not run again.
        logs = {r["dir"]: Path(r["dir"], "train", "metrics.jsonl").read_text() for r in rows}
        assert main(["sweep", str(path)]) == 0
        assert {
            r["dir"]: Path(r["dir"], "train", "metrics.jsonl").read_text() for r in leaderboard(sweep_dir)
        } == logs
        assert (
            main(["export", str(sweep_dir), "-o", str(sweep_dir / "best.yaml")]) == 2
        )  # no silent overwrite

        # A trial over its GPU share (0.05 GiB here: gpu_memory_gb x gpus_per_worker) fails before
        # any worker starts, and Optuna hears of a failed trial. (TPE's seed 4 proposes 64 first.)
        fit_space = {"optim.lr": {"loguniform": [3e-3, 1e-2]}, "train.micro_batch_size": {"choice": [4, 64]}}
        fit_space_file = write(tmp_path, "fit.yaml", {"params": fit_space})
        spec["sweep"].update(name="fit", num_samples=1, seed=4, search_space=str(fit_space_file))
        spec["trial"]["scale"]["gpu_memory_gb"] = 0.1
        assert main(["sweep", str(write(tmp_path, "fit_sweep.yaml", spec))]) == 0
        (row,) = leaderboard(tmp_path / "sweeps" / "fit")
        assert row["status"] == "failed" and row["params"]["train.micro_batch_size"] == 64
        assert not (Path(row["dir"]) / "train" / "workers.jsonl").exists()  # no worker ever started
        assert "does not fit: peak " in capfd.readouterr().err
        study = optuna.load_study(study_name="fit", storage=study_storage(tmp_path / "sweeps" / "fit"))
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    finally:
        ray.shutdown()


def test_a_trial_and_its_train_controller_load_no_model_stack():
    """A sweep's trial runs run_trial and Ray Train's controller holds worker_loop, so each process
    loads tune_run.py or ray_train.py: neither may load what only the workers need (the trainer,
    models, data, NF4), which took seconds of every trial's start."""
    heavy = ("loqt_ray.trainer", "transformers", "bitsandbytes", "datasets", "deepspeed")
    probe = (
        "import sys, loqt_ray.tune_run, loqt_ray.ray_train; "
        + f"print([m for m in {heavy} if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_asha_settings_are_not_checked_when_asha_is_off(tmp_path):
    from loqt_ray.sweep_plan import load_sweep

    spec = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    spec["sweep"]["search_space"] = str(ROOT / "search_spaces" / "cpu_tiny.yaml")
    spec["asha"] = {"enabled": False, "grace_period_tokens": 10**9}
    sweep, _, _ = load_sweep(write(tmp_path, "sweep.yaml", spec))
    assert not sweep.asha.enabled
    spec["asha"]["enabled"] = True
    with pytest.raises(ConfigError, match="asha.grace_period_tokens"):
        load_sweep(write(tmp_path, "sweep.yaml", spec))


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys):
    import ray

    args = [
        "sweep",
        str(ROOT / "jobs" / "sweep.yaml"),
        "--dry-run",
        "--set",
        f"sweep.storage_path={tmp_path}/s",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "loqt.rank_fraction       choice [0.0625, 0.125, 0.25]" in out
    assert "trials: 6 (num_samples 6 x 1 grid points; Optuna TPE, seed 0), 2 at a time" in out
    assert "tokens per trial: 245,760 (240 steps of 1,024)" in out
    assert "tokens without early stopping: 1,474,560" in out
    assert "tokens with ASHA" in out and "each trial asks for 0.91 CPU" in out
    assert not ray.is_initialized() and not (tmp_path / "s").exists()
    grid = ["--set", "sweep.num_samples=2", "--set", "trial.scale.use_gpu=true", "--set",
            "trial.scale.gpus_per_worker=0.5"]  # fmt: skip
    space = write(tmp_path, "space.yaml", {"params": {"optim.lr": {"grid": [1e-3, 1e-2, 3e-2]}}})
    assert main([*args, *grid, "--set", f"sweep.search_space={space}"]) == 0
    out = capsys.readouterr().out
    assert "trials: 6 (num_samples 2 x 3 grid points; Tune's grid" in out
    assert "each trial asks for 0.91 CPU + 0.5 GPU" in out and "2 at a time: 1.82 CPU + 1 GPU" in out


def _fake_finished_sweep(tmp_path, values: dict) -> Path:
    """A sweep directory as a finished sweep leaves it, with one trial trained on `values`."""
    from loqt_ray.rundir import write_config
    from loqt_ray.sweep_plan import load_sweep, trial_config

    spec = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    spec["sweep"]["search_space"] = str(ROOT / "search_spaces" / "cpu_tiny.yaml")
    sweep_dir = tmp_path / "sweeps" / "demo-sweep"
    sweep_dir.mkdir(parents=True)
    write(sweep_dir, "sweep.yaml", spec)
    sweep, base, _ = load_sweep(sweep_dir / "sweep.yaml")
    trial_dir = sweep_dir / "run_trial_0123abcd_1_loqt_rank_fraction=0.1250_2026-11-30_10-00-00"
    cfg = trial_config(base, values, sweep, trial_dir)
    write_config(trial_dir / "train", cfg)
    row = {"step": cfg.train.steps, "tokens": 245760, "val_ppl": 240.5}
    (trial_dir / "train" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (trial_dir / "params.json").write_text(json.dumps(values))
    return sweep_dir


def test_export_resolves_a_relative_rank_on_the_production_model_and_says_what_changed(tmp_path, capsys):
    sweep_dir = _fake_finished_sweep(tmp_path, {"loqt.rank_fraction": 0.125, "optim.lr": 0.004})
    assert (
        yaml.safe_load((next(sweep_dir.glob("run_trial_*")) / "train" / "config.yaml").read_text())["loqt"][
            "rank"
        ]
        == 16
    )  # 0.125 of the tiny model's 128
    out = tmp_path / "best.yaml"
    assert main(["export", str(sweep_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    best = load_config(out)
    assert best.model.size == "60m" and best.loqt.rank == 64 and best.optim.lr == 0.004  # 0.125 of 512
    assert "  loqt.rank: 16 -> 64  (loqt.rank_fraction 0.125 of this model's hidden size)" in printed
    assert "  model.size: tiny -> 60m" in printed and "optim.lr" not in printed  # searched: carried
    # Not searched, the scale takes the production model's default, which is not what the winner had.
    moved = "0.125 (the tiny model's default) -> 0.25 (the 60m model's default)"
    assert f"  loqt.lora_alpha: {moved}" in printed and best.lora_scale() == 0.25
    assert "memory on a 24 GiB GPU (scale.gpu_memory_gb): peak" in printed and ": fits;" in printed
    written = yaml.safe_load(out.read_text())
    changed = written["provenance"]["changed"]
    assert changed["loqt.rank"] == [16, 64] and "loqt.rank_fraction" not in changed
    # Paths as the sweep file has them (the trials ran on absolute ones), and only production's changes.
    assert (written["data"]["data_dir"], written["train"]["output_dir"]) == ("data", "runs")
    assert not {"data.data_dir", "train.output_dir", "train.name"} & set(changed)

    # On a GPU too small for it the export says so, with the micro-batch that would fit.
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    spec["production"]["scale"]["gpu_memory_gb"] = 1
    write(sweep_dir, "sweep.yaml", spec)
    assert main(["export", str(sweep_dir), "-o", str(out), "--force"]) == 0
    assert ": does NOT fit; the largest micro-batch that fits is " in capsys.readouterr().out


def test_rank_fraction_is_checked_and_resolved_per_model():
    assert load_config(None, ["loqt.rank_fraction=0.25"]).loqt.rank == 32
    assert load_config(None, ["loqt.rank_fraction=0.25", "model.size=1b"]).loqt.rank == 512
    with pytest.raises(ConfigError, match=r"loqt.rank_fraction: must be in \(0, 1\]"):
        load_config(None, ["loqt.rank_fraction=1.5"])


def _source_sweep(tmp_path, params, trials: int):
    """A finished sweep's directory as a warm start reads it: its file, its space and its Optuna
    study (journal storage), the study's trials told a made-up val ppl."""
    import optuna

    from loqt_ray.sweep_plan import study_storage

    src = tmp_path / "src"
    src.mkdir()
    write(src, "sweep.yaml", {"sweep": {"name": "src"}})
    write(src, "search_space.yaml", {"params": {p.key: {p.kind: list(p.values)} for p in params}})
    study = optuna.create_study(study_name="src", storage=study_storage(src), direction="minimize")
    distributions = {p.key: p.optuna() for p in params}
    for _ in range(trials):
        trial = study.ask(distributions)
        study.tell(trial, 100 + 1000 * abs(trial.params["optim.lr"] - 0.01))
    return src


def test_a_warm_started_search_proposes_from_another_sweeps_study_kept_in_its_own_journal(tmp_path):
    """The searcher a sweep runs (real Optuna, its journal storage): seeded with another sweep's 12
    finished trials it proposes otherwise than a cold one with the same seed, and its own study,
    in the sweep directory, holds those trials and its proposals for optuna.load_study to read."""
    import optuna

    from loqt_ray.sweep_plan import load_sweep, study_storage
    from loqt_ray.tune_run import optuna_search

    sweep, _, params = load_sweep(ROOT / "jobs" / "sweep.yaml")
    src = _source_sweep(tmp_path, params, trials=12)

    def proposals(sweep_dir, warm_start=None):
        sweep_dir.mkdir()
        search = optuna_search(sweep, params, sweep_dir, warm_start)
        search.set_search_properties("val_ppl", "min", {})
        return [search.suggest(f"trial{i}") for i in range(3)]

    cold = proposals(tmp_path / "cold")
    warm = proposals(tmp_path / "warm", src)
    assert cold != warm and cold == proposals(tmp_path / "cold2")  # seeded: the difference is the start
    study = optuna.load_study(study_name=sweep.sweep.name, storage=study_storage(tmp_path / "warm"))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 12 and len(states) == 15


def test_a_warm_start_from_another_space_is_refused_before_any_cluster(tmp_path, capsys):
    import ray

    from loqt_ray.search_space import parse_space

    other = parse_space(ROOT / "search_spaces" / "gpu_60m.yaml")
    src = _source_sweep(tmp_path, other, trials=2)
    argv = ["sweep", str(ROOT / "jobs" / "sweep.yaml"), "--warm-start", str(src), "--set",
            f"sweep.storage_path={tmp_path}/s"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--warm-start" in err[0] and "another space" in err[0]
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def _processes_with(marker: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("LOQT_TEST_SWEEP") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_whose_driver_is_killed_mid_trial_goes_on_from_the_trials_last_rung(tmp_path, data_dir):
    """`loqt-ray sweep` killed (SIGKILL of its process group) after its first trial's first rung,
    then run again: the trial goes on from its rung's checkpoint (no step trained or logged twice)
    and ends where the same trial run straight ends; the Optuna study in the sweep directory can be
    read while the sweep is down and after it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    import optuna
    import torch

    from loqt_ray.checkpoint import latest, step_of
    from loqt_ray.engine import engine_for
    from loqt_ray.rundir import read_metrics
    from loqt_ray.sweep_plan import study_storage
    from loqt_ray.trainer import Trainer

    space = write(tmp_path, "space.yaml", {"params": {"optim.lr": {"loguniform": [3e-3, 1e-2]}}})
    spec = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    spec["sweep"].update(name="k", storage_path=str(tmp_path / "sweeps"), num_samples=2,
                         max_concurrent_trials=1, tokens_per_trial=8 * 64 * 96,
                         eval_every_tokens=8 * 64 * 24, search_space=str(space))  # fmt: skip
    spec["asha"]["grace_period_tokens"] = 8 * 64 * 24
    spec["trial"].update(model={"size": "nano"},
                         data={"data_dir": data_dir, "vocab_size": 2048, "seq_len": 64},
                         train={"micro_batch_size": 8, "eval_tokens": 2048})  # fmt: skip
    spec["trial"]["scale"].update(cpus_per_worker=1)
    path = write(tmp_path, "sweep.yaml", spec)
    sweep_dir = tmp_path / "sweeps" / "k"
    marker = uuid.uuid4().hex
    env = {**os.environ, "LOQT_TEST_SWEEP": marker}
    cmd = [sys.executable, "-m", "loqt_ray.cli", "sweep", str(path)]

    driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "first.log", "w"))  # fmt: skip
    try:
        deadline, rung = time.monotonic() + 400, None
        while rung is None and time.monotonic() < deadline and driver.poll() is None:
            found = list(sweep_dir.glob("*/train/checkpoint_*/step.json"))
            rung = found[0].parent if found else None  # the first trial's first rung: kill now
            time.sleep(0.1)
        assert rung is not None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    for _ in range(120):  # the local Ray the driver started goes with it; what is left is stopped
        if not _processes_with(marker):
            break
        time.sleep(0.5)
    for proc in _processes_with(marker):
        proc.kill()
    run = rung.parent
    at_kill, resumed_at = read_metrics(run), step_of(latest(run))
    study = optuna.load_study(study_name="k", storage=study_storage(sweep_dir))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]  # the sweep is down

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = read_metrics(run)
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 96  # every step logged once, to the end
    kill_time = max(row["time"] for row in at_kill)
    assert resumed_at % 24 == 0 and 24 <= resumed_at < 96  # a rung's checkpoint
    assert at_kill[-1]["step"] - resumed_at <= 24  # at most one evaluation interval trained again
    assert all((row["time"] <= kill_time) == (row["step"] <= resumed_at) for row in rows)
    assert len({row["time"] for row in read_workers(run)}) == 2  # two starts of its workers
    study = optuna.load_study(study_name="k", storage=study_storage(sweep_dir))
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    # The same trial run straight, in this process, as its worker ran it (its engine, one thread).
    cfg = load_config(run / "config.yaml", [f"train.output_dir={tmp_path / 'straight'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = Trainer(cfg, make_engine=engine_for(cfg)).train()
    finally:
        torch.set_num_threads(threads)
    assert rows[-1]["val_ppl"] == pytest.approx(straight["val_ppl"], rel=1e-4)
