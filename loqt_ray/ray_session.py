"""The Ray session of a driver: start or join a cluster, check what a run asks of it, and free
what Ray leaks. The only module that touches Ray's private API (the leaked-group janitor; each
use cites its upstream issue).

Token authentication: a local Ray started here creates its token on first use (Ray 2.60's
default for clusters it starts); joining a cluster uses the token file every node shares
(docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import os
import sys

from .config import Config, ConfigError
from .progress import Periodic


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
    first (LeakedGroups, in this process, names its cluster itself). No node address is
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


class LeakedGroups(Periodic):
    """Frees the CPUs Ray Train sometimes leaks when Tune stops a trial. The trial's controller is
    aborted and stops its PlacementGroupCleaner, and now and then the workers' placement group
    outlives them (most early stops, on a loaded machine), holding its CPUs:
    later trials then wait for workers that never come and the sweep stalls. A group shaped like a
    trial's workers that no live actor uses, seen so in two checks `every_s` apart, is removed.
    The checks run in a thread of their own: Tune's loop is not guaranteed to turn while it waits.
    Train V2 runs inside Tune leak these groups (ray-project/ray#54305, #53921); the cleaner Ray
    added for them (ray-project/ray#58515) does not catch every one. Ray has no public way to
    make a PlacementGroup handle from a listed group's id: ray._raylet's PlacementGroupID is it."""

    every_s = 20.0

    def __init__(self, scale):
        self.shape = [worker_resources(scale)] * scale.num_workers
        self.suspects: set[str] = set()

    def tick(self) -> None:
        import ray
        from ray._raylet import PlacementGroupID  # private: PlacementGroup needs its id type
        from ray.util import remove_placement_group, state
        from ray.util.placement_group import PlacementGroup

        # The state API is told which cluster: on its own it refuses where two Rays run here
        ask = dict(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000, timeout=10)
        try:
            groups = state.list_placement_groups(filters=[("state", "=", "CREATED")], **ask)
            actors = state.list_actors(filters=[("state", "!=", "DEAD")], **ask)
        except Exception as exc:  # the state API can time out on a loaded machine: next time
            print(f"leaked placement groups: not checked ({exc.__class__.__name__})", file=sys.stderr)
            return
        used = {a.placement_group_id for a in actors}
        idle = {
            g.placement_group_id
            for g in groups
            if g.placement_group_id not in used and [b["unit_resources"] for b in g.bundles] == self.shape
        }
        for group in idle & self.suspects:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))
            print(f"removed placement group {group}: a stopped trial's workers had left it", file=sys.stderr)
        self.suspects = idle - self.suspects
