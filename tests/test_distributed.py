"""Ray Train + DeepSpeed ZeRO-2 with 2 gloo workers on CPU: the real stack, small model."""
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from loqt_ray.config import ConfigError, load_config
from loqt_ray.launch import latest_checkpoint, load_state, read_metrics, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # generous: CI compiles DeepSpeed ops first


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def two_worker_config(data_dir, out, name, steps, *extra):
    return load_config(None, [
        f"data.data_dir={data_dir}", "data.vocab_size=2048", "data.seq_len=64", "model.size=nano",
        "loqt.rank=8", "loqt.schedule=static", "loqt.update_interval=4", "loqt.refresh_interval=8",
        "optim.lr=3e-3", "optim.warmup_steps=2", f"train.steps={steps}", "train.micro_batch_size=4",
        "train.grad_accum=2", "train.log_every=1", f"train.eval_every={steps}", "train.eval_tokens=2048",
        f"train.output_dir={out}", f"train.name={name}", "scale.num_workers=2", "scale.cpus_per_worker=0.5",
        "scale.zero_stage=2", *extra])


def losses_by_step(run_dir):
    """The last logged loss of each step (a recovered run logs the steps after its checkpoint again)."""
    return {m["step"]: m["train_loss"] for m in read_metrics(run_dir)}


def digest_loop(config):
    """Like launch.worker_loop, but every rank writes a digest of its NF4 weights at each checkpoint."""
    import ray.train
    import torch

    from loqt_ray.config import Config, from_dict
    from loqt_ray.distributed import DeepSpeedEngine
    from loqt_ray.trainer import train

    torch.set_num_threads(1)
    cfg = from_dict(Config, config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])

    def save(state, metrics):
        quantized = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in state["buffers"].items()
                     if "weight_q" in k}
        with open(out / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": state["step"], "updates": metrics["updates"], "digests": quantized,
                                "loss": metrics["train_loss"]}) + "\n")
        ray.train.report(metrics)

    train(cfg, lambda m: ray.train.report(m), rank, 2, make_engine=DeepSpeedEngine, save=save)


def test_two_workers_learn_and_keep_identical_quantized_weights(ray_cluster, data_dir, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = two_worker_config(data_dir, tmp_path, "digest", 16, "train.checkpoint_every=4")
    TorchTrainer(digest_loop, train_loop_config={"cfg": cfg.to_dict(), "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="digest", storage_path=str(tmp_path / "ray"))).fit()
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [row["step"] for row in ranks[0]] == [4, 8, 12, 16]
    assert ranks[0][-1]["updates"] == 4  # merges at 0, 4, 8, 12 (refreshes at 0 and 8)
    for row0, row1 in zip(*ranks):
        assert row0["digests"] == row1["digests"]  # bit-identical NF4 weights on both ranks after merges
    assert len({json.dumps(r["digests"]) for r in ranks[0]}) == 4  # and each merge changed them
    assert ranks[0][-1]["loss"] < ranks[0][0]["loss"] - 0.3


def kill_a_worker_after(run_dir: Path, step: int, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        if latest_checkpoint(run_dir) is not None and max(losses_by_step(run_dir), default=0) >= step:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.1)


def test_resume_and_worker_loss_reproduce_the_straight_run(ray_cluster, data_dir, tmp_path):
    steps = 24
    straight = run_training(two_worker_config(data_dir, tmp_path, "straight", steps), progress=False)
    assert straight["step"] == steps

    # The same run, checkpointed every 6 steps, with a worker SIGKILLed after the first checkpoint:
    # Ray restarts both workers from the latest checkpoint and the run finishes all its steps.
    cfg = two_worker_config(data_dir, tmp_path, "killed", steps, "train.checkpoint_every=6", "scale.max_failures=2")
    killed = []
    watcher = threading.Thread(target=kill_a_worker_after, args=(tmp_path / "killed", 6, killed), daemon=True)
    watcher.start()
    final = run_training(cfg, progress=False)
    watcher.join()
    assert killed, "no worker was killed"
    assert final["step"] == steps
    rows = read_metrics(tmp_path / "killed")
    assert len(rows) > steps  # some steps ran twice: before the kill and after the restart

    # N steps, then the same command again (it resumes from the run's checkpoint), then N more.
    first = run_training(two_worker_config(data_dir, tmp_path, "halves", steps, f"train.stop_at_step={steps // 2}"),
                         progress=False)
    assert first["step"] == steps // 2
    assert load_state(latest_checkpoint(tmp_path / "halves") / "state.pt")["step"] == steps // 2
    second = run_training(two_worker_config(data_dir, tmp_path, "halves", steps), progress=False)
    assert second["step"] == steps and len(read_metrics(tmp_path / "halves")) == steps

    reference = losses_by_step(tmp_path / "straight")
    for name in ("killed", "halves"):
        got = losses_by_step(tmp_path / name)
        assert all(abs(got[s] - reference[s]) < 1e-5 for s in range(1, steps + 1)), name

    # Resuming under another model shape is refused before any cluster work, run untouched.
    before = (tmp_path / "halves" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="train.name"):
        run_training(two_worker_config(data_dir, tmp_path, "halves", steps, "loqt.rank=4"), progress=False)
    assert (tmp_path / "halves" / "metrics.jsonl").read_text() == before
