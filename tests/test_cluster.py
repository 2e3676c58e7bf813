"""A small cluster for real: ranks that agree after merges, two Ray nodes on this machine, lost nodes."""

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import nano_config

from loqt_ray.checkpoint import RAY_SNAPSHOT, latest, step_of
from loqt_ray.distributed import free_port
from loqt_ray.engine import PlainEngine
from loqt_ray.leaderboard import leaderboard
from loqt_ray.rundir import read_metrics, read_workers

ROOT = Path(__file__).resolve().parent.parent


def _state_digest(trainer) -> str:
    h = hashlib.sha256()
    for _, layer in trainer.named_layers:
        for t in [*layer.buffers(), trainer.engine.full_precision(layer.B)]:
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _agreement_worker(rank: int, port: int, data_dir: str, queue) -> None:
    """Two gloo ranks build the same model; rank 1's P (and so its W after a merge) drifts in one
    layer, as a different SVD build would make it; then the ranks are made to agree, each way."""
    from loqt_ray.trainer import Trainer, agree_with_rank_zero

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        trainer = Trainer(nano_config(data_dir, "loqt.update_interval=2"), rank, 2, make_engine=PlainEngine)
        name, layer = trainer.named_layers[3]
        for how in ("checksum", "broadcast"):
            if rank == 1:
                with torch.no_grad():
                    p = layer.projection_matrix()
                    layer.projection_q.quantize_(p + 0.01 * torch.randn_like(p))
            before = _state_digest(trainer)
            repaired = agree_with_rank_zero(trainer.named_layers, trainer.engine, how)
            queue.put((how, rank, name, before, repaired, _state_digest(trainer)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ranks_that_drifted_after_a_merge_are_repaired_from_rank_zero(data_dir, sotu):
    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_agreement_worker, args=(r, port, data_dir, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=200) for _ in range(4))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for how in ("broadcast", "checksum"):
        (_, _, name, before0, repaired0, after0), (_, _, _, before1, repaired1, after1) = [
            r for r in results if r[0] == how
        ]
        assert before0 != before1  # the drift is real: the ranks held different P
        assert after0 == after1 == before0  # every rank now holds rank 0's state, rank 0's unchanged
        # checksum sends only the layer that differed, and names it; broadcast sends all, names none
        assert repaired0 == repaired1 == ([name] if how == "checksum" else [])


# ---------------------------------------------------------------- two Ray nodes on this machine

BIN = Path(sys.executable).parent  # the venv whose `ray` and `loqt-ray` the nodes and drivers run
NANO = ["model.size=nano", "data.vocab_size=2048", "data.seq_len=64", "loqt.rank=8", "loqt.update_interval=3",
        "loqt.schedule=static", "optim.lr=3e-3", "optim.warmup_steps=2", "train.micro_batch_size=4",
        "train.eval_tokens=1024", "train.log_every=1", "scale.num_workers=2", "scale.cpus_per_worker=0.5",
        "scale.placement_strategy=SPREAD"]  # fmt: skip


# The runs that lose a node or their driver: a checkpoint every EVERY steps, and the loss comes right
# after the first. Steps take a fraction of a second, so the run must be long enough that it is still
# training when the loss lands.
STEPS, EVERY = 40, 8

MARK = "LOQT_RAY_TEST_PROCESS"  # set in the environment of what a test starts; every child inherits it


def processes_under(mark: str) -> list[int]:
    """PIDs of the processes a test started: those whose environment carries MARK=mark, and their
    descendants (Ray's agents get an environment of their own and rename themselves)."""
    needle, parents, marked = f"{MARK}={mark}".encode(), {}, set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                marked.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    found, grew = set(marked), True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def kill_under(mark: str, sig: int = signal.SIGKILL, wait: float = 20) -> None:
    """Signal only the processes marked `mark` (`ray stop` would stop every Ray on the machine)."""
    for pid in processes_under(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.time() + wait
    while processes_under(mark) and time.time() < deadline:
        time.sleep(0.5)


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    """A head and a second node, started with `ray start` as docs/cluster.md says: each 1 CPU on
    127.0.0.1 with its own temp dir and resource label, token auth on (a token in their HOME)."""

    def __init__(self, home: Path):
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}:{os.environ['PATH']}",
            # The head declares a node dead after 3 failed health checks a second apart (Ray's
            # default: 5, 3 s apart): the tests that lose a node wait for that three times.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = {
            label: tempfile.mkdtemp(prefix=prefix, dir="/tmp")
            for label, prefix in (("head", "lrh"), ("node2", "lrn"))
        }  # fmt: skip  (short: unix socket paths)
        assert self.ray("get-auth-token", "--generate").returncode == 0

    def ray(self, *args, timeout=120, mark: str = "client"):
        return subprocess.run(
            [str(BIN / "ray"), *args], env={**self.env, MARK: mark}, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def _start(self, label: str, *args) -> None:
        done = self.ray(
            "start", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp[label]}", "--num-cpus=1",
            f"--resources={json.dumps({label: 1})}", f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats", mark=self.temp[label],
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    def start(self) -> None:
        self._start(
            "head", "--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={free_port()}",
        )  # fmt: skip
        self.start_node2()

    def start_node2(self) -> None:
        self._start("node2", f"--address={self.address}")
        wait_for("the second node to join", lambda: "node2" in self.alive(), 60)

    def alive(self) -> dict[str, str]:
        """label -> node id of the live nodes."""
        out = self.ray("list", "nodes", "--address", f"http://127.0.0.1:{self.dashboard}", "--format", "json")
        nodes = json.loads(out.stdout) if out.returncode == 0 else []
        return {
            label: n["node_id"]
            for n in nodes
            if n["state"] == "ALIVE"
            for label in ("head", "node2")
            if label in n["resources_total"]
        }

    def kill_node2(self) -> None:
        kill_under(self.temp["node2"])
        assert not processes_under(self.temp["node2"])

    def stop(self) -> None:
        for label in ("node2", "head"):
            kill_under(self.temp[label], signal.SIGTERM, wait=5)
            kill_under(self.temp[label])
        left = [pid for label in ("node2", "head") for pid in processes_under(self.temp[label])]
        for temp in self.temp.values():
            shutil.rmtree(temp, ignore_errors=True)
        assert not left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # the token and ~/loqt-ray (jobs/runtime_env.yaml), nothing else
    nodes = Cluster(home)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def start_driver(cluster, log: Path, *args) -> subprocess.Popen:
    """`loqt-ray ARGS` as a user runs it against the cluster, in its own process group."""
    return subprocess.Popen(
        [str(BIN / "loqt-ray"), *args], env=cluster.env, cwd=ROOT, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def train_args(data_dir, out: Path, name: str, *extra, steps: int = STEPS) -> list[str]:
    sets = [*NANO, f"data.data_dir={data_dir}", f"train.output_dir={out}", f"train.name={name}",
            f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={EVERY}",
            *extra]  # fmt: skip
    return ["train", *[a for s in sets for a in ("--set", s)]]


def placements(run: Path) -> list[dict[int, str]]:
    """rank -> node id for each start of the worker group, from the run's workers.jsonl."""
    groups: dict[float, dict[int, str]] = {}
    for row in read_workers(run):
        groups.setdefault(row["time"], {})[row["rank"]] = row["node_id"]
    return [groups[t] for t in sorted(groups)]


# Before the tests that start the two-node cluster: its idle nodes would slow this one's Ray down.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_driver_killed_alone_leaves_no_ray_behind_and_the_same_command_resumes(data_dir, sotu, tmp_path):
    """`kill -9` of `loqt-ray train` alone (as an out-of-memory kill would): the local Ray it started
    goes with it (Ray ties the processes it starts to their parent), and a rerun resumes. The
    data cache is given relative to where the command runs, as the default `data` is: the worker
    uses that cache, not one of its own in Ray's temp folder."""
    temps = [tempfile.mkdtemp(prefix="lrd", dir="/tmp") for _ in range(2)]  # each run's Ray root and mark
    here = tmp_path / "here"
    here.mkdir()
    (here / "cache").symlink_to(data_dir)

    def command(temp: str, **how) -> dict:
        env = {**os.environ, "RAY_TMPDIR": temp, "PATH": f"{BIN}:{os.environ['PATH']}", MARK: temp}
        env.pop("RAY_ADDRESS", None)
        return dict(args=[str(BIN / "loqt-ray"), *args], env=env, cwd=here, **how)

    # Its worker goes on for a second or two after the driver dies (1 worker: about 0.1 s a step).
    steps = 2 * STEPS
    args = train_args(
        data_dir, tmp_path, "killed", "scale.num_workers=1", "scale.cpus_per_worker=1", "data.data_dir=cache",
        steps=steps,
    )  # fmt: skip
    run, log = tmp_path / "killed", tmp_path / "driver.log"
    driver = subprocess.Popen(**command(temps[0], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True))  # fmt: skip
    try:
        wait_for("a checkpoint", lambda: latest(run), 240, every=0.25)
        assert processes_under(temps[0])  # the local Ray is up
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, not its process group
        driver.wait(timeout=30)
        # The rerun starts as a user's would: once the run has stopped training (its Ray's other
        # processes may take up to a minute to go; the rerun starts a Ray of its own meanwhile).
        wait_for("the killed run to stop training", _unchanged_for(run / "metrics.jsonl", 5.0), 120)
        saved = step_of(latest(run))
        assert saved < steps  # the kill cut the run short
        # Ray rewrites its checkpoint record in place after each checkpoint; a kill can land in that
        # moment (one run of this test in many did) and leave it empty. Here it always does.
        record = run / RAY_SNAPSHOT
        json.loads(record.read_text())  # Ray wrote it, under this name
        record.write_bytes(b"")
        rerun = subprocess.run(**command(temps[1], capture_output=True, text=True, timeout=300))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"resuming killed from step {saved}" in rerun.stderr
        assert f"record {record} was cut short" in rerun.stderr
        assert (run / f"{RAY_SNAPSHOT}.stale").read_bytes() == b""
        json.loads(record.read_text())  # written whole again by the rerun
        assert [m["step"] for m in read_metrics(run)] == list(range(1, steps + 1))
        assert not [p for temp in temps for p in Path(temp).rglob("packed")]  # no second data cache
        for temp, which in zip(temps, ("killed run's", "rerun's"), strict=True):
            try:
                wait_for(f"the {which} Ray processes to exit", lambda t=temp: not processes_under(t), 120)
            except AssertionError:
                left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in processes_under(temp)}
                raise AssertionError(f"left behind by the {which} Ray: {left}") from None
    finally:
        for temp in temps:
            kill_under(temp)
            shutil.rmtree(temp, ignore_errors=True)


def _unchanged_for(path: Path, seconds: float):
    """A check for wait_for: true once `path` has not changed for `seconds`."""
    seen = {"stat": None, "since": time.time()}

    def check() -> bool:
        stat = path.stat().st_mtime_ns, path.stat().st_size
        if stat != seen["stat"]:
            seen.update(stat=stat, since=time.time())
        return time.time() - seen["since"] >= seconds

    return check


# Run as `python -c` by the test below: a local Ray as `loqt-ray train` and `sweep` start it; the
# live actors that the state API, asked as Ray Train's cleaner asks it, finds from an actor; and
# what a sweep's leak check does with a group shaped like a trial's workers that no actor uses.
LOCAL_STATE_PROBE = """
import json

import ray
from ray.util import placement_group, placement_group_table, state
from loqt_ray.config import load_config
from loqt_ray.ray_session import LeakedGroups, start_ray, worker_resources

start_ray(None)

@ray.remote(num_cpus=0)
class Probe:
    def listed(self):
        alive = state.list_actors(filters=[("state", "=", "ALIVE")], timeout=30)
        return ray.get_runtime_context().get_actor_id(), [a.actor_id for a in alive]

actor, listed = ray.get(Probe.remote().listed.remote())
scale = load_config(None, []).scale
group = placement_group([worker_resources(scale)] * scale.num_workers)
ray.get(group.ready())
leaks = LeakedGroups(scale)
for _ in range(2):  # an idle group goes on the second check that sees it
    leaks.tick()
print(json.dumps(dict(gcs=ray.get_runtime_context().gcs_address, actor=actor, listed=listed,
                      group=placement_group_table(group)["state"])))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_local_ray_beside_another_asks_the_state_api_about_itself(cluster):
    """With another Ray on this machine (the two-node cluster), a local Ray as `loqt-ray train` and
    `sweep` start it: the state API answers about it from its own processes (where Ray Train's
    placement-group cleaner asks), and a sweep's leak check frees an idle group. Not told which
    Ray to ask, the state API refuses where it sees two, and a sweep's stopped trials then kept
    their CPUs until it stalled."""
    temp = tempfile.mkdtemp(prefix="lrs", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp, MARK: temp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", LOCAL_STATE_PROBE], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["gcs"].rsplit(":", 1)[1] != str(cluster.port)  # a Ray of its own, not the cluster
        assert seen["actor"] in seen["listed"]
        assert "not checked" not in done.stderr and "removed placement group" in done.stderr
        assert seen["group"] == "REMOVED"
    finally:
        kill_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lost_node_stops_a_run_in_one_line_and_a_rerun_allowed_a_restart_survives_the_next(
    cluster, data_dir, sotu, tmp_path
):
    """Workers go one per node. With no restart allowed (the default), losing node 2 after a
    checkpoint stops the run with one line naming the node and that checkpoint. The same command
    with scale.max_failures=1 resumes there, spread over both nodes again; when node 2 is lost once
    more, the group restarts from the newest checkpoint on the head (2 x 0.5 CPU fit there) and the
    run completes, every step logged once."""
    nodes = cluster.alive()
    args = train_args(data_dir, tmp_path, "lost", f"scale.address={cluster.address}")
    run = tmp_path / "lost"

    def newest_checkpoint() -> int:
        found = latest(run)
        return step_of(found) if found else 0

    def lose_node2_after(step: int, log: Path, *extra: str) -> tuple[int, int]:
        """Run the command until a checkpoint past `step` exists, then kill node 2 (and bring it back
        once the driver has exited). Returns the driver's exit code and that checkpoint's step."""
        driver = start_driver(cluster, log, *args, *extra)
        try:
            wait_for(f"a checkpoint after step {step}", lambda: newest_checkpoint() > step, 240, every=0.25)
            saved = newest_checkpoint()
            cluster.kill_node2()
            return driver.wait(timeout=300), saved
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            cluster.start_node2()

    code, _ = lose_node2_after(0, tmp_path / "stopped.log")
    text = (tmp_path / "stopped.log").read_text()
    assert code == 1, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("loqt-ray train: stopped: lost rank")]
    assert nodes["node2"][:12] in line and "rerun the same command to resume" in line
    stopped_at = step_of(latest(run))
    assert f"the last checkpoint is step {stopped_at}" in line and "Traceback" not in text

    again = cluster.alive()  # node 2 is back, under a new node id
    code, saved = lose_node2_after(stopped_at, tmp_path / "rerun.log", "--set", "scale.max_failures=1")
    log = (tmp_path / "rerun.log").read_text()
    assert code == 0, log[-3000:]
    assert f"resuming lost from step {stopped_at}" in log
    assert f"workers restarted after a failure; going on from the checkpoint at step {saved}" in log
    first, rerun, restarted = placements(run)
    assert sorted(first.values()) == sorted([nodes["head"], nodes["node2"]])
    assert sorted(rerun.values()) == sorted([again["head"], again["node2"]])
    assert restarted == {0: again["head"], 1: again["head"]}
    assert [m["step"] for m in read_metrics(run)] == list(range(1, STEPS + 1))  # redone steps logged once
    assert stopped_at >= EVERY and f"done: lost step {STEPS}" in log


# 96 steps a trial, a few seconds of training: long enough to lose node 2 while one trains there.
SWEEP = ["sweep.name=clustertest", "sweep.num_samples=3", "sweep.tokens_per_trial=49152",
         "sweep.eval_every_tokens=12288", "asha.enabled=false", "trial.model.size=nano",
         "trial.data.vocab_size=2048", "trial.data.seq_len=64", "trial.train.eval_tokens=2048"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_job_runs_trials_on_both_nodes_and_goes_on_when_one_is_lost(cluster, tmp_path):
    """`ray job submit` of the sweep, as docs/cluster.md does it; its trials land on both nodes; node 2
    dies while a trial runs there: that trial fails and the others finish."""
    nodes = cluster.alive()
    # The job API is on loopback only and refuses a request without the token.
    url = f"http://127.0.0.1:{cluster.dashboard}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(url, timeout=10)
    external = socket.gethostbyname(socket.gethostname())
    if not external.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((external, cluster.dashboard), timeout=3).close()

    home = Path(cluster.env["HOME"])
    sweep_dir = home / "loqt-ray" / "runs" / "sweeps" / "clustertest"  # LOQT_RAY_HOME: outlives the job
    log = tmp_path / "job.log"
    submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}",
              "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", "loqt-ray", "sweep",
              "jobs/sweep.yaml", *[a for s in SWEEP for a in ("--set", s)]]  # fmt: skip

    def trial_nodes() -> dict[Path, set[str]]:
        return {run.parent: {n for p in placements(run) for n in p.values()}
                for run in sweep_dir.glob("*/train") if (run / "workers.jsonl").exists()}  # fmt: skip

    def training_on_node2() -> list[Path]:
        """Trials with a worker on node 2 and no final checkpoint yet (a trial saves only at its end)."""
        return [trial for trial, where in trial_nodes().items()
                if nodes["node2"] in where and not latest(trial / "train")]  # fmt: skip

    # Right after the head starts, Ray may refuse a submission until its job agent has registered
    # ("No available agent to submit job"), running nothing: so try again, a bounded number of times.
    for _ in range(30):
        job = subprocess.Popen(
            submit, env=cluster.env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.wait(timeout=20)
        if job.poll() is None or "No available agent" not in log.read_text():
            break
        time.sleep(2)
    try:
        on_node2 = wait_for("a trial training on node 2", training_on_node2, 400, every=0.1)
        cluster.kill_node2()
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
        cluster.start_node2()
    text = log.read_text()
    assert "succeeded" in text
    rows = leaderboard(sweep_dir)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(rows) == 3 and 1 <= len(failed) <= 2 and len(failed) < len(rows)
    assert any(Path(r["dir"]) in on_node2 for r in failed)  # the trial running on the lost node
    assert set(nodes.values()) <= set().union(*trial_nodes().values())  # trials ran on both nodes
    assert f"trial {failed[0]['trial']} failed:" in text  # the live display said so, in the job's log
    assert "of 3 trials" in text and "Configuration for experiment" not in text  # Ray's banner: in ray.log
    assert "Configuration for experiment" in (sweep_dir / "ray.log").read_text()
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["provenance"]["trial"] in text and best["model"]["size"] == "60m"
    assert best["data"]["data_dir"] == "data"  # as the sweep file says, not the job's rooted cache path
    assert (sweep_dir / "report" / "summary.md").exists() and (home / "loqt-ray" / "data" / "packed").is_dir()
    assert not (ROOT / "runs" / "sweeps" / "clustertest").exists()
