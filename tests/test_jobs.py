"""`ray job submit` of a sweep to a local head, exactly as the README does it, token auth on."""

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
import yaml

from loqt_ray.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv whose `ray` and `loqt-ray` the cluster runs
TINY = [
    "--set",
    "sweep.name=jobtest",
    "--set",
    "sweep.num_samples=2",
    "--set",
    "sweep.tokens_per_trial=6144",
    "--set",
    "sweep.eval_every_tokens=1536",
    "--set",
    "asha.grace_period_tokens=1536",
    "--set",
    "trial.model.size=nano",
    "--set",
    "trial.data.vocab_size=2048",
    "--set",
    "trial.data.seq_len=64",
    "--set",
    "trial.train.eval_tokens=2048",
]


def _processes_under(temp_dir: str) -> list[int]:
    """PIDs of the Ray processes this head started (their command lines name its temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _stop_head(temp_dir: str) -> None:
    """Stop only this head (`ray stop` would stop every Ray on the machine); workers die with it."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in _processes_under(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _processes_under(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_job_submit_runs_a_sweep_and_exports_best_yaml(tmp_path):
    home = tmp_path / "home"  # the token, ~/loqt-ray (LOQT_RAY_HOME in runtime_env.yaml) and nothing else
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="lrj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        # DeepSpeed's CPU op is JIT-compiled once per machine; keep using the real cache.
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()

    def ray(*args, timeout=120):
        return subprocess.run(
            [str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    assert ray("get-auth-token", "--generate").returncode == 0
    try:
        head = ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=2",
            "--disable-usage-stats",
        )
        assert head.returncode == 0, head.stderr[-3000:]

        # The job API is on loopback only and refuses a request without the token.
        url = f"http://127.0.0.1:{dashboard}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url, timeout=10)
        external = socket.gethostbyname(socket.gethostname())
        if not external.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((external, dashboard), timeout=3).close()

        def submit():
            return ray(
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--working-dir",
                ".",
                "--runtime-env",
                "jobs/runtime_env.yaml",
                "--",
                "loqt-ray",
                "sweep",
                "jobs/sweep.yaml",
                *TINY,
                timeout=780,
            )

        # The head answers before its job agent has registered (slowly on a loaded 2-core machine);
        # until then Ray refuses a submission, running nothing, with "No available agent to submit
        # job, please try again later": so try again, a bounded number of times.
        for _ in range(30):
            job = submit()
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]

        sweep_dir = home / "loqt-ray" / "runs" / "sweeps" / "jobtest"  # outlives the job's working-dir copy
        best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
        assert best["provenance"]["trial"] in log and best["model"]["size"] == "60m"
        assert best["data"]["data_dir"] == "data"  # as the sweep file says, not the job's rooted cache path
        assert (sweep_dir / "report" / "summary.md").exists()
        assert (home / "loqt-ray" / "data" / "packed").is_dir()
        assert not (ROOT / "runs" / "sweeps" / "jobtest").exists()
    finally:
        _stop_head(temp_dir)
        assert not _processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
