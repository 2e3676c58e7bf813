"""Training under Ray Train: the TorchTrainer of a run, and the loop each of its workers runs.

Each worker builds a `trainer.Trainer` (the engine `loqt-ray train` runs for the config), goes
on from the run directory's latest checkpoint, and trains into a `RaySink`: every logged step
to rank 0's metrics.jsonl (which the driver's bar follows), evaluations and checkpoints to Ray.
A worker lost mid-run makes Ray restart the group, which goes on from the latest checkpoint
(FailureConfig).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from . import checkpoint, rundir
from .config import Config, from_dict
from .ray_session import worker_resources
from .sink import Sink


class RaySink(Sink):
    """A worker's results: metrics.jsonl (rank 0) for every logged step, Ray for what it needs.

    Ray's report blocks until its controller has taken the previous one, and the controller looks
    every 2 s: reported at every logged step, that would set the pace of a fast run. So Ray gets
    the checkpoints (its record and restarts) and the evaluations (Tune: ASHA, the display); every
    rank takes the same decision, as Ray's checkpoint reports require."""

    def __init__(self, log: rundir.MetricsLog, rank: int):
        self.log_file, self.rank = log, rank

    def log(self, metrics: dict) -> None:
        import ray.train

        self.log_file.write(metrics)
        if "val_ppl" in metrics:
            ray.train.report(metrics)

    def checkpoint(self, metrics: dict, state) -> None:
        import ray.train

        self.log_file.write(metrics)
        folder = checkpoint.stage(state(), self.rank)
        try:
            reported = ray.train.Checkpoint.from_directory(str(folder)) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=reported)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch

    cfg = from_dict(Config, config["cfg"])
    cuda = cfg.scale.use_gpu and torch.cuda.is_available()  # else the CPU fallback (trainer.py)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, round(cfg.scale.cpus_per_worker)))
    from .trainer import Trainer

    out, ctx = Path(config["run_dir"]), ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    checkpoint.remove_orphaned_staging()
    record_placement(out, rank, world_size)
    trainer = Trainer(cfg, rank, world_size)
    state = checkpoint.resume_state(out, rank, world_size)
    if state is not None:
        trainer.resume(state)
    log = rundir.MetricsLog(out, rank, trainer.step)  # drops logged steps past the (re)start
    try:
        trainer.train(RaySink(log, rank))
    finally:
        log.close()


def record_placement(out: Path, rank: int, world_size: int) -> None:
    """Rank 0 appends where every rank runs (node, host, pid, and the GPU it was given: Ray's
    CUDA_VISIBLE_DEVICES and the device's name) to the run's workers.jsonl, gathered over the
    process group."""
    import ray
    import torch

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
    everyone = [me]
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, me)
    if rank == 0:
        rundir.record_workers(out, everyone)


def make_trainer(cfg: Config, out: Path, callbacks: list = ()):
    """The Ray Train TorchTrainer of the run in `out`, its workers as scale asks."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .distributed import process_group_backend

    scale = cfg.scale
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(out)},
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=scale.use_gpu,
            resources_per_worker=worker_resources(scale),
            placement_strategy=scale.placement_strategy,
        ),
        torch_config=TorchConfig(backend=process_group_backend(scale.use_gpu)),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=scale.max_failures),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
