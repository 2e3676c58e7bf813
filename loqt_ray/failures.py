"""Failures of a Ray Train run, as the one line a user can act on: a non-finite loss, an input a
worker's node cannot see, workers lost with their node or process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from . import checkpoint, rundir
from .config import Config, ConfigError


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
    placed = {row["rank"]: row for row in rundir.read_workers(out)}  # the last start's placement
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
