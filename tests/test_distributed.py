"""Ray Train + DeepSpeed ZeRO-2 with 2 gloo workers on CPU: the real stack, small model."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import torch
from conftest import nano_config

from loqt_ray.checkpoint import latest, read
from loqt_ray.config import ConfigError
from loqt_ray.launch import run_training
from loqt_ray.ray_session import start_local_ray
from loqt_ray.rundir import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # generous: 2-core CI runners are slow


@pytest.fixture(scope="module")
def ray_cluster():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def two_worker_config(data_dir, out, name, steps, *extra):
    return nano_config(
        data_dir, "loqt.update_interval=4", "loqt.refresh_interval=8", f"train.steps={steps}",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.log_every=1", f"train.eval_every={steps}",
        "train.eval_tokens=2048", f"train.output_dir={out}", f"train.name={name}", "scale.num_workers=2",
        "scale.cpus_per_worker=0.5", "scale.zero_stage=2", *extra,
    )  # fmt: skip


def losses_by_step(run_dir):
    return {m["step"]: m["train_loss"] for m in read_metrics(run_dir)}


def digest(tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def digest_loop(config):
    """Like ray_train.worker_loop, but every rank writes digests of its NF4 weights and of P at each
    checkpoint, and rank 0 its losses."""
    import ray.train
    import torch

    from loqt_ray.config import Config, from_dict
    from loqt_ray.distributed import DeepSpeedEngine
    from loqt_ray.sink import Sink
    from loqt_ray.trainer import Trainer

    torch.set_num_threads(1)
    cfg = from_dict(Config, config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])

    class Digests(Sink):  # to files only: Ray needs nothing from this loop (no checkpoints, no Tune)
        def log(self, metrics):
            with open(out / f"loss{rank}.jsonl", "a") as f:
                row = {
                    "step": metrics["step"],
                    "loss": metrics["train_loss"],
                    "repairs": metrics["rank_repairs"],
                }
                f.write(json.dumps(row) + "\n")

        def checkpoint(self, metrics, state):
            save(state())
            self.log(metrics)

    def save(state):
        buffers = state["buffers"]
        row = {
            "step": state["step"],
            "updates": state["counters"]["updates"],
            "w": {k: digest(v) for k, v in buffers.items() if "weight_q" in k},
            "p": {k: digest(v) for k, v in buffers.items() if ".projection" in k},  # dense or NF4
        }
        with open(out / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    Trainer(cfg, rank, 2, make_engine=DeepSpeedEngine).train(Digests())


def fit_digest_run(cfg, out: Path) -> list[list[dict]]:
    """Fit digest_loop on 2 gloo workers; return each rank's checkpoint rows."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        digest_loop,
        train_loop_config={"cfg": cfg.to_dict(), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=cfg.train.name, storage_path=str(out / "ray")),
    ).fit()
    return [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


STEPS = 24


@pytest.fixture(scope="module")
def straight(ray_cluster, data_dir, tmp_path_factory):
    """The reference: 24 steps on 2 workers, checkpoint states every 6 (merges at 0, 4, 8, ...,
    refreshes at 0, 8, 16, from the whole step's gradient summed in host buffers), with activation
    checkpointing (the killed-worker run, without it, follows these losses). Returns (per-rank
    digest rows, rank 0's loss per step)."""
    out = tmp_path_factory.mktemp("straight")
    extra = ("train.checkpoint_every=6", "train.activation_checkpointing=true")
    cfg = two_worker_config(data_dir, out, "straight", STEPS, *extra)
    assert cfg.refresh_method() == "offload" and cfg.train.grad_accum == 2
    ranks = fit_digest_run(cfg, out)
    rows = [json.loads(line) for line in (out / "loss0.jsonl").read_text().splitlines()]
    assert all(row["repairs"] == 0 for row in rows)  # the ranks' merges agree without repair
    return ranks, {row["step"]: row["loss"] for row in rows}


def test_two_workers_learn_and_keep_identical_quantized_weights(straight):
    ranks, losses = straight
    assert [row["step"] for row in ranks[0]] == [6, 12, 18, 24]
    assert [row["updates"] for row in ranks[0]] == [2, 3, 5, 6]  # merges at 0, 4, 8, 12, 16, 20
    for row0, row1 in zip(*ranks, strict=True):
        assert row0["w"] == row1["w"] and row0["p"] == row1["p"]  # bit-identical W and P on both ranks
    assert len({json.dumps(r["w"]) for r in ranks[0]}) == 4  # every 6 steps hold a merge: W changed
    p = [json.dumps(r["p"]) for r in ranks[0]]
    assert len(set(p[:3])) == 3 and p[3] == p[2]  # P refreshed at 8 and 16, not again before 24
    assert losses[STEPS] < losses[1] - 0.3


def test_layerwise_refreshes_agree_across_ranks(ray_cluster, data_dir, tmp_path):
    """One micro-batch per step: each rank all-reduces every layer's gradient inside backward
    (alongside ZeRO-2's own reductions) and takes the same P from it."""
    cfg = two_worker_config(
        data_dir,
        tmp_path,
        "layerwise",
        8,
        "train.grad_accum=1",
        "train.micro_batch_size=8",
        "loqt.refresh=layerwise",
        "loqt.refresh_interval=4",
        "train.checkpoint_every=4",
    )
    ranks = fit_digest_run(cfg, tmp_path)
    repairs = [json.loads(line)["repairs"] for line in (tmp_path / "loss0.jsonl").read_text().splitlines()]
    assert repairs and all(r == 0 for r in repairs)  # P taken from the reduced gradient agrees as is
    assert [row["step"] for row in ranks[0]] == [4, 8]
    for row0, row1 in zip(*ranks, strict=True):
        assert row0["w"] == row1["w"] and row0["p"] == row1["p"]
    assert ranks[0][0]["p"] != ranks[0][1]["p"]  # refreshed at 0 and 4 (P was taken in backward)


def killing_loop(config):
    """ray_train.worker_loop, except that rank 1 SIGKILLs itself (as an out-of-memory kill would)
    right after the step named in the run directory's `kill_after` file, once, and every resume
    writes the step it resumed from."""
    from loqt_ray import ray_train
    from loqt_ray.trainer import Trainer

    out = Path(config["run_dir"])
    train_step, resume = Trainer.train_step, Trainer.resume

    def step_then_die(self):
        train_step(self)
        trigger = out / "kill_after"
        if self.rank == 1 and trigger.exists() and self.step == int(trigger.read_text()):
            trigger.rename(out / "killed")
            os.kill(os.getpid(), signal.SIGKILL)

    def resume_and_record(self, state):
        resume(self, state)
        if self.rank == 0:
            with open(out / "resumed_from", "a") as f:
                f.write(f"{self.step}\n")

    Trainer.train_step, Trainer.resume = step_then_die, resume_and_record
    ray_train.worker_loop(config)


def test_a_killed_worker_and_a_rerun_on_one_worker_resume_from_checkpoints_and_reproduce_the_straight_run(
    straight, data_dir, tmp_path, monkeypatch, capsys
):
    """Steps 1-12 on 2 workers (ZeRO-2) with a worker killed at step 9, then the same run resumed
    on 1 worker (ZeRO-0, the same global batch as micro-batch 8): the checkpoint loads on another
    world size and 1 worker trains the model 2 workers train."""
    from loqt_ray import checkpoint, ray_train

    _, reference = straight
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(ray_train, "worker_loop", killing_loop)
    run = tmp_path / "resumed"
    extra = ("train.checkpoint_every=6", "scale.max_failures=2")

    # A checkpoint folder an earlier worker on this host left when it was killed before Ray took it.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = Path(tempfile.mkdtemp(prefix=checkpoint.staging_prefix(gone.pid)))

    # 12 of 24 steps; rank 1 dies after step 9, Ray restarts both workers from the step-6 checkpoint.
    run.mkdir()
    (run / "kill_after").write_text("9")
    first = two_worker_config(data_dir, tmp_path, "resumed", STEPS, *extra, "train.stop_at_step=12")
    assert run_training(first, progress=False)["step"] == 12
    assert not orphan.exists()  # the first worker to start here deleted it
    assert (run / "killed").exists() and (run / "resumed_from").read_text().split() == ["6"]
    assert [row["step"] for row in read_metrics(run)] == list(range(1, 13))  # steps 7-9 once
    assert all(row["rank_repairs"] == 0 for row in read_metrics(run))  # merges agree on both ranks
    assert read(latest(run) / "state.pt")["step"] == 12

    # The step-12 checkpoint (2 workers, ZeRO-2) exports to a plain transformers model.
    from transformers import AutoModelForCausalLM

    from loqt_ray.export_hf import export_hf, fold_loqt, load_trained

    step_12 = latest(run)
    exported = AutoModelForCausalLM.from_pretrained(export_hf(step_12, tmp_path / "hf"))
    folded = fold_loqt(load_trained(step_12)[1])
    ids = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, folded(input_ids=ids).logits, atol=1e-5)

    # The same run again, without the stop, on one worker: it resumes from step 12 and says so.
    one = ("scale.num_workers=1", "train.micro_batch_size=8", "scale.zero_stage=0", "scale.cpus_per_worker=1")
    second = run_training(
        two_worker_config(data_dir, tmp_path, "resumed", STEPS, *extra, *one), progress=False
    )
    assert second["step"] == STEPS
    assert "resuming resumed from step 12" in capsys.readouterr().err
    assert (run / "resumed_from").read_text().split() == ["6", "12"]
    assert [row["step"] for row in read_metrics(run)] == list(range(1, STEPS + 1))
    got = losses_by_step(run)
    assert all(abs(got[s] - reference[s]) < 1e-5 for s in range(1, 13))
    # one worker sums the 8 sequences in another order than two workers' all-reduce: float noise only
    assert all(abs(got[s] - reference[s]) < 1e-4 for s in range(13, STEPS + 1)), (got, reference)

    # Resuming under another model shape is refused before any cluster work, run untouched.
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="train.name"):
        run_training(two_worker_config(data_dir, tmp_path, "resumed", STEPS, "loqt.rank=4"), progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_per_layer_updates_under_ray_stop_resume_and_match_the_in_process_run(
    ray_cluster, data_dir, tmp_path
):
    """Per-layer updates (the plain engine on one Ray worker): stopped at step 4 and rerun, the run
    reproduces the same config trained straight in this process."""
    from loqt_ray.sink import Collect
    from loqt_ray.trainer import Trainer

    def cfg(*extra):
        return nano_config(
            data_dir, "optim.per_layer=true", "optim.name=adam8bit", "loqt.update_interval=3",
            "train.steps=8",
            "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=8", "train.micro_batch_size=4",
            "train.eval_tokens=1024", f"train.output_dir={tmp_path}", "train.name=per-layer",
            "scale.zero_stage=0", "scale.cpus_per_worker=1", *extra,
        )  # fmt: skip

    assert run_training(cfg("train.stop_at_step=4"), progress=False)["step"] == 4
    assert run_training(cfg(), progress=False)["step"] == 8
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker ran (cpus_per_worker=1): SVDs round by thread count
    try:
        Trainer(cfg()).train(Collect(rows))
    finally:
        torch.set_num_threads(threads)
    got = losses_by_step(tmp_path / "per-layer")
    assert list(got) == list(range(1, 9))
    assert all(abs(got[row["step"]] - row["train_loss"]) < 1e-5 for row in rows), [
        (row["step"], got[row["step"]] - row["train_loss"]) for row in rows
    ]


def test_a_run_the_cluster_cannot_place_is_refused_not_left_waiting(ray_cluster, data_dir, tmp_path):
    """Ray would wait forever for resources it does not have: the launcher refuses first."""
    gpus = two_worker_config(data_dir, tmp_path, "gpus", 4, "scale.use_gpu=true")
    with pytest.raises(ConfigError, match=r"scale.gpus_per_worker: the run asks for 2 GPUs .* has 0"):
        run_training(gpus, progress=False)
    cpus = two_worker_config(data_dir, tmp_path, "cpus", 4, "scale.cpus_per_worker=2")
    with pytest.raises(ConfigError, match=r"scale.cpus_per_worker: the run asks for 4 CPUs .* has 2"):
        run_training(cpus, progress=False)
