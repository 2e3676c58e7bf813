from pathlib import Path

import pytest
import yaml

from loqt_ray.cli import main
from loqt_ray.config import ConfigError, load_config
from loqt_ray.results import leaderboard
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
def test_sweep_runs_stops_exports_and_resumes(tmp_path, data_dir):
    """A real sweep: local Ray, a grid beside sampled values, ASHA, 4 trials of 1 DeepSpeed worker each.
    (Optuna's TPE, used when a space has no grid, runs in test_jobs.)"""
    import ray

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
        tokens_per_trial=8 * 64 * 24,
        eval_every_tokens=8 * 64 * 6,
        search_space=str(space),
    )
    spec["asha"]["grace_period_tokens"] = 8 * 64 * 6
    spec["trial"]["model"] = {"size": "nano"}
    spec["trial"]["data"] = {"data_dir": data_dir, "vocab_size": 2048, "seq_len": 64}
    spec["trial"]["train"] = {"micro_batch_size": 8, "eval_tokens": 2048}
    spec["trial"]["scale"]["cpus_per_worker"] = 0.5
    path = write(tmp_path, "sweep.yaml", spec)
    try:
        assert main(["sweep", str(path)]) == 0
        sweep_dir = tmp_path / "sweeps" / "t"
        rows = leaderboard(sweep_dir)
        assert len(rows) == 4 and all(r["status"] in ("completed", "stopped early") for r in rows)
        assert sorted(r["params"]["optim.lr"] for r in rows) == [1e-5, 1e-5, 1e-2, 1e-2]
        stopped = [r for r in rows if r["status"] == "stopped early"]
        assert stopped and all(r["params"]["optim.lr"] == 1e-5 and r["tokens"] < 8 * 64 * 24 for r in stopped)
        assert rows[0]["params"]["optim.lr"] == 1e-2
        assert all(0 < r["tokens"] <= 8 * 64 * 24 for r in rows)
        assert rows[0]["val_ppl"] == min(r["val_ppl"] for r in rows)
        assert "| trial | status | tokens | val ppl |" in (sweep_dir / "leaderboard.md").read_text()

        best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
        assert best["provenance"]["trial"] == rows[0]["trial"] and best["model"]["size"] == "60m"
        assert best["loqt"]["rank"] == rows[0]["params"]["loqt.rank"]
        cfg = load_config(sweep_dir / "best.yaml")  # `loqt-ray train --config best.yaml` accepts it as is
        assert cfg.train.steps == 10000 and cfg.scale.use_gpu

        # The report: plots and a summary from the sweep directory's files alone.
        summary = (sweep_dir / "report" / "summary.md").read_text()
        assert f"Best: trial {rows[0]['trial']}" in summary and "Parameter importances (PED-ANOVA" in summary
        for png in ("val_ppl", "importances", "parallel_coordinates"):
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
    finally:
        ray.shutdown()


def test_asha_settings_are_not_checked_when_asha_is_off(tmp_path):
    from loqt_ray.sweep import load_sweep

    spec = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    spec["sweep"]["search_space"] = str(ROOT / "search_spaces" / "cpu_tiny.yaml")
    spec["asha"] = {"enabled": False, "grace_period_tokens": 10**9}
    sweep, _, _ = load_sweep(write(tmp_path, "sweep.yaml", spec))
    assert not sweep.asha.enabled
    spec["asha"]["enabled"] = True
    with pytest.raises(ConfigError, match="asha.grace_period_tokens"):
        load_sweep(write(tmp_path, "sweep.yaml", spec))
