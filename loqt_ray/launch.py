"""Ray Train around the trainer: workers, DeepSpeed, checkpoints, resume, fault tolerance, progress.

Each worker runs a `trainer.Trainer` with a DeepSpeed engine (the plain engine under
per-layer updates, which are single-worker). Checkpoint states (checkpoint.py) go to Ray
with the report of their step, written by rank 0. A worker lost mid-run makes Ray restart
the group from the latest checkpoint (FailureConfig). Running the same command again with
the same run name resumes from the run's latest checkpoint. Rank 0 also writes
metrics.jsonl (each step once) and TensorBoard events, which the driver tails for its
progress bar.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from . import checkpoint, results
from .config import Config, ConfigError, RunStopped, from_dict


class _RankZeroLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, out: Path, rank: int, resumed_step: int):
        self.enabled = rank == 0
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        results.truncate_metrics(out, resumed_step)
        self.writer = SummaryWriter(str(out / results.TENSORBOARD_DIR))
        self.file = open(out / results.METRICS_FILE, "a")

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


def _resume_state(run_dir: Path, rank: int, world_size: int) -> dict | None:
    """The state every rank goes on from: rank 0 picks the run directory's newest readable
    checkpoint and the others load the same one. The directory, not Ray's record, is the source:
    after a lost worker Ray may restart the group before it registered the last checkpoint rank 0
    wrote, and a rerun of the command finds it there too (Train V2 has no resume_from_checkpoint)."""
    import torch.distributed

    chosen, state = [None], None
    if rank == 0:
        for directory in sorted(run_dir.glob("checkpoint_*"), key=checkpoint.step_of, reverse=True):
            try:
                state = checkpoint.read(directory / checkpoint.STATE_FILE)
            except ConfigError:  # cut short while being written when its worker died: the one before
                continue
            chosen = [str(directory)]
            break
    if world_size > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    if chosen[0] is None or state is not None:
        return state
    path = Path(chosen[0]) / checkpoint.STATE_FILE
    if not path.exists():
        raise ConfigError(
            "train.output_dir", f"rank {rank} cannot read {path}: it must be on storage every node mounts"
        )
    return checkpoint.read(path)


def _record_placement(out: Path, rank: int, world_size: int) -> None:
    """Rank 0 appends where every rank runs (node, host, pid) to the run's workers.jsonl, gathered
    over the process group."""
    import ray
    import torch.distributed

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid()}  # fmt: skip
    everyone = [me]
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, me)
    if rank == 0:
        results.record_workers(out, everyone)


def engine_for(cfg: Config):
    """The engine a worker runs: DeepSpeed, except under per-layer updates (single-worker, plain)."""
    if cfg.optim.per_layer:
        from .engine import PlainEngine

        return PlainEngine
    from .distributed import DeepSpeedEngine

    return DeepSpeedEngine


# A checkpoint goes to Ray from a folder of its own in the worker's temp dir, named after the worker's
# host and process: a worker killed before Ray took it (a lost node's peers, a restart, kill -9)
# leaves it. The host is in the name because containers can share a temp dir but not their PIDs.
STAGING_PREFIX = "loqt-ckpt-"


def _host_staging_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname()}-"


def staging_prefix(pid: int | None = None) -> str:
    """The start of the names of the checkpoint folders of process `pid` (this one) on this host."""
    return f"{_host_staging_prefix()}{os.getpid() if pid is None else pid}-"


def remove_orphaned_staging(root: str | Path | None = None) -> None:
    """Delete the checkpoint folders in this host's temp dir (`root`) whose worker process is gone:
    each is a whole checkpoint (a 7B LoQT one is several GB), one per kill that landed between
    writing it and Ray copying it into the run directory."""
    host = _host_staging_prefix()
    for folder in Path(root or tempfile.gettempdir()).glob(f"{host}*-*"):
        # exactly PID-random (mkdtemp's part has no '-'): host "node" must not claim "node-12"'s
        parts = folder.name.removeprefix(host).split("-")
        if len(parts) == 2 and parts[0].isdigit() and not _process_alive(int(parts[0])):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    remove_orphaned_staging()
    _record_placement(Path(config["run_dir"]), rank, ctx.get_world_size())
    trainer = Trainer(cfg, rank, ctx.get_world_size(), engine_for(cfg))
    state = _resume_state(Path(config["run_dir"]), rank, ctx.get_world_size())
    if state is not None:
        trainer.resume(state)
    # rank 0 drops any logged steps past where the group (re)starts: they are logged again
    log = _RankZeroLog(Path(config["run_dir"]), rank, trainer.step)
    pending: list[str] = []  # a checkpoint written by save(), handed to Ray with its step's report

    def save(state: dict) -> None:
        tmp = tempfile.mkdtemp(prefix=staging_prefix())
        if rank == 0:
            checkpoint.write(Path(tmp), state)
        pending.append(tmp)

    def report(metrics: dict) -> None:
        log.write(metrics)  # every logged step: metrics.jsonl, which the bar follows
        # Ray's report blocks until its controller has taken the previous one, and the controller
        # looks every 2 s: reported at every logged step, that would set the pace of a fast run.
        # Ray needs the checkpoints, Tune (ASHA, the sweep's display) the evaluations; all ranks
        # take the same decision here, as Ray's checkpoint reports require.
        if not pending:
            if "val_ppl" in metrics:
                ray.train.report(metrics)
            return
        tmp = pending.pop()
        try:
            reported = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(metrics, checkpoint=reported)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        trainer.train(report, save)
    finally:
        log.close()


def start_ray(address: str | None) -> None:
    """Join the Ray cluster at `address` (or at the RAY_ADDRESS that `ray job submit` sets for its
    jobs), else start a new local one, even where a `ray start` cluster runs on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray()


def start_local_ray(**resources) -> None:
    """A new Ray on this machine (`resources`: ray.init's num_cpus, num_gpus; Ray's count if none).

    Its dashboard is on 127.0.0.1: Ray Train's placement-group cleaner asks the dashboard's state
    API whether a stopped trial's controller is gone, and without it every trial ASHA stops leaks
    its workers' CPUs. The state API is not told which cluster to ask: it looks for Ray on this
    machine and refuses if it finds two, so beside any other Ray here (a second run, a `ray start`
    cluster) the leaks came back and a sweep stalled. So the dashboard's address, chosen here, is
    in the environment that the Ray processes started here inherit, where the state API looks
    first (sweep._LeakedGroups, in this process, names its cluster itself). No node address is
    given: Ray 2.60 turns 127.0.0.1 into this machine's address anyway (docs/cluster.md)."""
    import ray

    from .distributed import free_port

    port = free_port()
    with _environment(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}"):
        ray.init(
            address="local", log_to_driver=False, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=port, **resources,
        )  # fmt: skip


@contextlib.contextmanager
def _environment(**values: str):
    """os.environ with `values` set while the block runs, as it was afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_resources(scale, extra_cpu: float = 0.0) -> None:
    """Refuse a run the Ray cluster can never place (Ray would wait for the resources forever)."""
    import ray

    have = ray.cluster_resources()
    wanted = {"CPU": scale.num_workers * scale.cpus_per_worker + extra_cpu}
    if scale.use_gpu:
        wanted["GPU"] = scale.num_workers * scale.gpus_per_worker
    for kind, need in wanted.items():
        field = "scale.gpus_per_worker" if kind == "GPU" else "scale.cpus_per_worker"
        if need > have.get(kind, 0) + 1e-9:
            raise ConfigError(
                field,
                f"the run asks for {need:g} {kind}s ({scale.num_workers} workers), the Ray cluster has "
                f"{have.get(kind, 0):g}; lower scale.num_workers or {field}"
                + (", or set scale.use_gpu=false" if kind == "GPU" else ""),
            )


def check_host_memory(cfg: Config, local: bool) -> None:
    """Refuse a GPU run whose workers' host memory at step 0 (memory.host_bytes) the machines
    cannot hold: this machine's memory for a local run (checked before Ray starts), else each
    live Ray node's memory as Ray counts it."""
    from . import memory

    if local:
        import psutil

        nodes = [
            (float(psutil.virtual_memory().total), float(cfg.scale.num_workers * cfg.scale.gpus_per_worker))
        ]
    else:
        import ray

        alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        nodes = [(r.get("memory", 0.0) + r.get("object_store_memory", 0.0), r.get("GPU", 0.0)) for r in alive]
    why = memory.host_memory_shortfall(cfg, nodes)
    if why is not None:
        field = "loqt.refresh" if cfg.refresh_method() == "offload" else "model.size"
        raise ConfigError(
            field,
            f"{why}; set train.grad_accum=1 (layerwise refreshes keep no buffers) or loqt.refresh=exact "
            "(buffers on the device), or run on machines with more memory",
        )


def worker_resources(scale) -> dict[str, float]:
    """What Ray reserves for each worker of a run (and so the shape of its placement group)."""
    return {"CPU": scale.cpus_per_worker, **({"GPU": scale.gpus_per_worker} if scale.use_gpu else {})}


# Ray Train's record of the checkpoints a run reported (Train V2 keeps it in the run directory).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_stale_ray_record(out: Path) -> None:
    """Move Ray's checkpoint record aside, saying so on stderr, where Ray would refuse to start the
    run again from it: when it is not whole JSON (Ray rewrites it in place after every checkpoint,
    so a run killed at that moment, by kill -9 or the OOM killer, leaves it empty or cut short), or
    when it names a checkpoint directory that is gone (deleted by hand, as resume_point advises for
    a truncated one). Resuming needs only the run's own checkpoints (worker_loop reads the
    directory); the record serves pruning to train.keep_checkpoints, which then covers only
    checkpoints written from here on."""
    record = out / RAY_SNAPSHOT
    try:
        saved = json.loads(record.read_bytes())
    except FileNotFoundError:  # a new run
        return
    except ValueError:  # JSONDecodeError; UnicodeDecodeError is one too
        why = "was cut short (the run was killed while writing it)"
    else:
        reported = saved.get("checkpoint_results", []) if isinstance(saved, dict) else []
        named = {r.get("checkpoint_dir_name") for r in reported if isinstance(r, dict)} - {None}
        gone = sorted(named - {p.name for p in out.iterdir()})
        if not gone:
            return
        why = f"names {len(gone)} checkpoint(s) no longer in {out} ({', '.join(gone)})"
    aside = _unused_name(record.with_name(record.name + ".stale"))
    record.replace(aside)
    print(
        f"Ray's checkpoint record {record} {why}: moved to {aside.name}; resuming from the run's "
        "own checkpoints, and those already there are no longer pruned to train.keep_checkpoints",
        file=sys.stderr,
        flush=True,
    )


def _unused_name(path: Path) -> Path:
    """`path`, or `path`.2, .3, ... whichever is free: a record set aside at an earlier resume stays."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def make_trainer(cfg: Config, out: Path, callbacks: list = ()):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .distributed import process_group_backend

    scale = cfg.scale
    resources = worker_resources(scale)
    loop_config = {"cfg": cfg.to_dict(), "run_dir": str(out)}
    return TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=scale.use_gpu,
            resources_per_worker=resources,
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


def resume_point(cfg: Config, out: Path) -> Path | None:
    """The checkpoint a rerun of this run resumes from (None for a new run), checked before
    anything starts: same model and loqt sections, a readable checkpoint file."""
    latest = checkpoint.latest(out)
    if latest is None:
        if (out / results.METRICS_FILE).exists():
            raise ConfigError(
                "train.name", f"{out} holds a run without a checkpoint to resume; choose another name"
            )
        return None
    saved, wanted = results.read_config(out), cfg.to_dict()
    if saved.get("model") != wanted["model"] or saved.get("loqt") != wanted["loqt"]:
        raise ConfigError(
            "train.name",
            f"{out} was trained with another model or loqt section; resume with the same settings or "
            "choose another name",
        )
    checkpoint.check_file(latest / checkpoint.STATE_FILE)
    return latest


def stopped_reason(exc: Exception) -> str | None:
    """The one line of a non-finite loss (the user's to fix: lr, warmup) inside Ray's error."""
    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(failure, FloatingPointError):
            return str(getattr(failure, "cause", failure)).strip().splitlines()[-1]
    return None


def worker_config_error(exc: Exception) -> ConfigError | None:
    """A bad input only a worker could see (a path its node does not have; the driver checks every
    input before the cluster starts), as the driver's own error: one line naming the field, exit 2."""
    for rank, failure in sorted((getattr(exc, "worker_failures", None) or {}).items()):
        if isinstance(failure, ConfigError):
            where = (
                f"rank {rank}'s node does not see what the driver saw: every node that runs a worker needs it"
            )
            return ConfigError(failure.field, f"{failure.message} ({where})")
    return None


# How long a failed run waits for Ray to declare a silent rank's node dead: Ray's default health
# checks (5 failures, 3 s apart, 10 s timeout each) take about 15 s for a node whose processes are
# gone and up to about 55 s for a machine that stops answering.
NODE_VERDICT_WAIT_S = 60.0


def _silent_ranks_on_dead_nodes(failures: dict, placed: dict, world_size: int, console: TextIO) -> list[int]:
    """Ranks that reported nothing while the others failed, on nodes Ray declares dead (`placed`:
    rank -> its workers.jsonl row). A node lost mid-step breaks the survivors' next collective at
    once and they fail first; Ray takes a few health checks to declare the node dead, and until
    then the lost ranks' polls just hang. So when only some ranks failed, wait (up to
    NODE_VERDICT_WAIT_S) for the verdict on the others."""
    import ray

    silent = set(range(world_size)) - set(failures)
    if not failures or not silent:  # all ranks failed alike: an error of the run itself
        return []

    def on_dead_nodes() -> list[int]:
        dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
        return sorted(rank for rank in silent if rank in placed and placed[rank]["node_id"] in dead)

    lost = on_dead_nodes()
    if lost:
        return lost
    print(
        f"\nrank(s) {', '.join(map(str, sorted(failures)))} failed; waiting up to "
        f"{NODE_VERDICT_WAIT_S:.0f} s for Ray to say whether the node of rank(s) "
        f"{', '.join(map(str, sorted(silent)))} is lost",
        file=console,
        flush=True,
    )
    deadline = time.monotonic() + NODE_VERDICT_WAIT_S
    while not lost and time.monotonic() < deadline:
        time.sleep(1.0)
        lost = on_dead_nodes()
    return lost


def lost_workers_reason(exc: Exception, cfg: Config, out: Path, console: TextIO) -> str | None:
    """One line for a run whose workers were lost (their node or process died) once
    scale.max_failures restarts were spent: which ranks, on which nodes, and how to resume.
    `console` gets a line while it waits for Ray's verdict on a node."""
    import ray.exceptions

    def cause(failure: Exception) -> Exception | None:
        """The dead or unreachable worker behind a failure: Ray's own error, or the one Ray Train's
        health check wrapped."""
        for candidate in (failure, getattr(failure, "health_check_failure", None)):
            if isinstance(candidate, ray.exceptions.RayActorError):
                return candidate
        return None

    failures = getattr(exc, "worker_failures", None) or {}
    placed = {row["rank"]: row for row in results.read_workers(out)}  # the last start's placement
    lost = sorted(rank for rank, f in failures.items() if cause(f) is not None)
    if lost:
        first = str(cause(failures[lost[0]])).strip().splitlines()[0][:160]
    else:
        lost = _silent_ranks_on_dead_nodes(failures, placed, cfg.scale.num_workers, console)
        first = "Ray declared its node dead; the other ranks' collectives failed"
    if not lost:
        return None
    where = ", ".join(
        f"rank {r} on node {placed[r]['node_id'][:12]} ({placed[r]['host']})" if r in placed else f"rank {r}"
        for r in lost
    )
    saved = checkpoint.latest(out)
    scale = cfg.scale
    need = f"{scale.num_workers} workers x {scale.cpus_per_worker:g} CPU" + (
        f" + {scale.gpus_per_worker:g} GPU" if scale.use_gpu else ""
    )
    return (
        f"lost {where} ({first}) after {scale.max_failures} restart(s) allowed by scale.max_failures; "
        + (f"the last checkpoint is step {checkpoint.step_of(saved)}: " if saved else "no checkpoint yet: ")
        + f"rerun the same command to resume once the cluster has {need} free "
        "(or fewer with --set scale.num_workers=N)"
    )


def run_training(cfg: Config, progress: bool = True) -> dict:
    """Train under Ray; a second call with the same run name resumes. Returns the last metrics."""
    from .data import prepare
    from .progress import RunProgress, console_to_log

    out = results.run_dir(cfg)
    resume_from = resume_point(cfg, out)
    local = not (cfg.scale.address or os.environ.get("RAY_ADDRESS"))
    if local:  # before anything is written: this machine is the one node
        check_host_memory(cfg, local=True)
    # Data, tokenizer and packed sequences once, here: a bad source or tokenizer fails before any
    # cluster starts, and workers never race to build the same cache.
    results.start_run(out, cfg, prepare(cfg.data).tokenizer)
    start = checkpoint.step_of(resume_from) if resume_from is not None else 0
    if resume_from is not None:
        print(f"resuming {cfg.train.name} from step {start} ({resume_from})", file=sys.stderr)
        set_aside_stale_ray_record(out)
    print(f"{cfg.train.name}: Ray's own messages go to {out / results.RAY_LOG}", file=sys.stderr, flush=True)
    with console_to_log(out / results.RAY_LOG) as console:
        start_ray(cfg.scale.address)
        check_resources(cfg.scale)
        if not local:
            check_host_memory(cfg, local=False)
        with RunProgress(out, cfg.train.steps, cfg.train.name, progress, console, start):
            try:
                make_trainer(cfg, out).fit()
            except Exception as exc:
                bad_input = worker_config_error(exc)
                if bad_input is not None:
                    raise bad_input from None
                reason = stopped_reason(exc) or lost_workers_reason(exc, cfg, out, console)
                if reason is None:
                    raise
                raise RunStopped(reason) from None
    return results.read_metrics(out)[-1]
