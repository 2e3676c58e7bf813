"""Ray Train around the trainer: workers, DeepSpeed, checkpoints, resume, fault tolerance.

Each worker runs `trainer.train` with a DeepSpeed engine (plain torch optimizers
under per-layer updates, which are single-worker). Checkpoints are reported with
`ray.train.report(..., checkpoint=...)`: one `state.pt` of plain tensors, written
by rank 0 and loaded with weights_only=True. A worker lost mid-run makes Ray
restart the group from the latest checkpoint (FailureConfig). Running the same
command again with the same run name resumes from the run's latest checkpoint.
Rank 0 also writes metrics.jsonl and TensorBoard events into the run directory,
which the driver tails for its progress bar.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, RunStopped, from_dict
from .data import prepare

STATE_FILE = "state.pt"


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir).resolve() / cfg.train.name


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint directory (Ray's checkpoint_*) holding the highest step."""
    best, best_step = None, -1
    for state in out.glob(f"checkpoint_*/{STATE_FILE}"):
        meta = state.parent / "step.json"
        step = json.loads(meta.read_text())["step"] if meta.exists() else -1
        if step > best_step:
            best, best_step = state.parent, step
    return best


def check_checkpoint_file(path: Path) -> None:
    """Cheap integrity check without loading: a torch checkpoint is a zip whose directory sits at
    the end, so a truncated or foreign file fails here instead of inside a worker."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(str(path), f"truncated or not a torch checkpoint ({exc}); delete that checkpoint "
                          "directory to resume from an earlier one") from None


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or pickled-code files
        raise ConfigError(str(path), f"not a loadable loqt-ray checkpoint ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0][:160]})") from None


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    cfg = from_dict(Config, config["cfg"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scale.use_gpu else "cpu")
    if not cfg.scale.use_gpu:
        torch.set_num_threads(max(1, round(cfg.scale.cpus_per_worker)))
    from .distributed import DeepSpeedEngine
    from .trainer import PlainEngine, train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # After a worker failure Ray hands back the latest reported checkpoint; on a rerun of the
    # command the driver names the run's latest one (Train V2 has no resume_from_checkpoint).
    checkpoint = ray.train.get_checkpoint()
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(Path(d) / STATE_FILE)
    elif config["resume_from"]:
        resume = load_state(Path(config["resume_from"]) / STATE_FILE)
    out = Path(config["run_dir"])
    writer = log = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer, log = SummaryWriter(str(out / "tensorboard")), open(out / "metrics.jsonl", "a")

    def record(metrics: dict) -> None:
        if rank == 0:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(key, value, metrics["step"])

    def report(metrics: dict) -> None:
        record(metrics)
        ray.train.report(metrics)

    def save(state: dict, metrics: dict) -> None:
        record(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save(state, Path(tmp) / STATE_FILE)
                (Path(tmp) / "step.json").write_text(json.dumps({"step": state["step"]}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    engine = PlainEngine if cfg.optim.per_layer else DeepSpeedEngine
    try:
        train(cfg, report, rank, world, make_engine=engine, resume=resume, save=save)
    finally:
        if rank == 0:
            writer.close()
            log.close()


def start_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        # A local cluster keeps its dashboard on 127.0.0.1: Ray Train's placement-group
        # cleaner asks the dashboard's state API whether a stopped trial's controller is gone,
        # and without it every trial ASHA stops leaks its workers' CPUs. `address` (or the
        # RAY_ADDRESS that `ray job submit` sets for its jobs) joins an existing cluster.
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, log_to_driver=False,
                 **({} if address else {"_node_ip_address": "127.0.0.1", "include_dashboard": True,
                                        "dashboard_host": "127.0.0.1"}))


def make_trainer(cfg: Config, out: Path, resume_from: Path | None, callbacks: list = ()):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(out),
                           "resume_from": str(resume_from) if resume_from else None},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.train.name, storage_path=str(out.parent),
                             failure_config=FailureConfig(max_failures=s.max_failures), callbacks=list(callbacks),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )


def run_training(cfg: Config, progress: bool = True) -> dict:
    """Train under Ray; a second call with the same run name resumes. Returns the last metrics."""
    from tqdm import tqdm

    out = run_dir(cfg)
    resume_from = latest_checkpoint(out)
    if resume_from is None and (out / "metrics.jsonl").exists():
        raise ConfigError("train.name", f"{out} holds a run without a checkpoint to resume; choose another name")
    if resume_from is not None:
        saved = yaml.safe_load((out / "config.yaml").read_text())
        if saved.get("model") != cfg.to_dict()["model"] or saved.get("loqt") != cfg.to_dict()["loqt"]:
            raise ConfigError("train.name", f"{out} was trained with another model or loqt section; "
                              "resume with the same settings or choose another name")
        check_checkpoint_file(resume_from / STATE_FILE)
    # Data, tokenizer and packed sequences once, here: a bad source or tokenizer fails before any
    # cluster starts, and workers never race to build the same cache.
    data = prepare(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data.tokenizer.save_pretrained(str(out / "tokenizer"))  # the run is self-contained for export-hf
    start_ray(cfg.scale.address)
    previous = read_metrics(out)
    bar = tqdm(total=cfg.train.steps, initial=previous[-1]["step"] if previous else 0, desc=cfg.train.name,
               unit="step", dynamic_ncols=True, disable=not progress)
    done = threading.Event()
    tail = threading.Thread(target=_follow, args=(out / "metrics.jsonl", bar, done), daemon=True)
    tail.start()
    try:
        make_trainer(cfg, out, resume_from).fit()
    except Exception as exc:
        # A non-finite loss is the user's to fix (lr, warmup), not a crash: one clear line.
        for failure in (getattr(exc, "worker_failures", None) or {}).values():
            if isinstance(failure, FloatingPointError):
                raise RunStopped(str(getattr(failure, "cause", failure)).strip().splitlines()[-1]) from None
        raise
    finally:
        done.set()
        tail.join()
        bar.close()
    return read_metrics(out)[-1]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _follow(path: Path, bar, done: threading.Event) -> None:
    """Move the progress bar as rank 0 appends metrics (reading only what is new)."""
    offset = path.stat().st_size if path.exists() else 0
    while True:
        stopping = done.wait(0.5)
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                lines = f.readlines()
            complete = [line for line in lines if line.endswith("\n")]  # a half-written line waits
            offset += sum(len(line.encode()) for line in complete)
            for metrics in map(json.loads, complete):
                bar.update(metrics["step"] - bar.n)
                shown = {"loss": f"{metrics['train_loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                if "val_ppl" in metrics:
                    shown["ppl"] = f"{metrics['val_ppl']:.1f}"
                bar.set_postfix(shown)
        if stopping:
            return
