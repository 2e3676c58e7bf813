"""`loqt-ray train` on the driver: check the run, prepare its data, start or join Ray, fit the
run under Ray Train (ray_train.py) with a progress bar, and turn a failure into one line.

A second call with the same run name resumes from the run directory's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from . import checkpoint, rundir
from .config import Config, ConfigError, RunStopped
from .failures import lost_workers_reason, stopped_reason, worker_config_error
from .memory import fit_shortfall
from .ray_session import check_host_memory, check_resources, start_ray
from .ray_train import make_trainer


def run_training(cfg: Config, progress: bool = True) -> dict:
    """Train under Ray; a second call with the same run name resumes. Returns the last metrics."""
    from .data import prepare
    from .progress import RunProgress, console_to_log

    out = rundir.run_dir(cfg)
    resume_from = checkpoint.resume_point(cfg, out)
    too_big = fit_shortfall(cfg)
    if too_big is not None:
        raise ConfigError(
            "scale.gpu_memory_gb",
            f"{too_big} (scale.gpu_memory_gb x scale.gpus_per_worker): lower train.micro_batch_size (or set "
            "it to auto with train.sequences_per_step) or loqt.rank",
        )
    local = not (cfg.scale.address or os.environ.get("RAY_ADDRESS"))
    if local:  # before anything is written: this machine is the one node
        check_host_memory(cfg, local=True)
    # Data, tokenizer and packed sequences once, here: a bad source or tokenizer fails before any
    # cluster starts, and workers never race to build the same cache.
    rundir.start_run(out, cfg, prepare(cfg.data).tokenizer)
    start = checkpoint.step_of(resume_from) if resume_from is not None else 0
    if resume_from is not None:
        print(f"resuming {cfg.train.name} from step {start} ({resume_from})", file=sys.stderr)
        checkpoint.set_aside_stale_ray_record(out)
    print(f"{cfg.train.name}: Ray's own messages go to {out / rundir.RAY_LOG}", file=sys.stderr, flush=True)
    with console_to_log(out / rundir.RAY_LOG) as console:
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
    return rundir.read_metrics(out)[-1]
