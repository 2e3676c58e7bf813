"""A sweep's run: Ray Tune + Optuna + ASHA over trials that each fit a Ray Train run of the
trainer, the live display's feed, and the leaderboard, best config and report at the end.

Each trial is a Tune function trainable that fits a Ray Train TorchTrainer (Train V2), its
metrics forwarded with TuneReportCallback. Optuna's TPE (seeded) proposes values from the search
space; ASHA stops trials on validation perplexity with tokens seen as its clock. A trial that
fails (NaN loss, out of memory) is recorded as failed and the sweep goes on. Rerunning the same
command resumes the sweep without rerunning finished trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml

from .config import Config, ConfigError, RunStopped, SweepConfig, from_dict
from .leaderboard import leaderboard, leaderboard_markdown
from .rundir import (
    BEST_FILE,
    LEADERBOARD_FILE,
    METRICS_FILE,
    MLFLOW_DB,
    RAY_LOG,
    REPORT_DIR,
    SPACE_FILE,
    SWEEP_FILE,
    TRIAL_RUN,
    write_config,
)
from .search_space import Param
from .sweep_plan import (
    TRIAL_CPU,
    effective_sweep,
    has_grid,
    load_sweep,
    num_trials,
    study_storage,
    trial_budget,
    trial_config,
    warm_start_trials,
)


def tune_domain(param: Param):
    """A search-space entry as Ray Tune's sampling domain."""
    from ray import tune

    if param.kind == "choice":
        return tune.choice(list(param.values))
    if param.kind == "grid":
        return tune.grid_search(list(param.values))
    low, high = param.values
    sample = {"uniform": tune.uniform, "loguniform": tune.loguniform, "int": tune.randint}[param.kind]
    return sample(low, high + 1 if param.kind == "int" else high)  # randint's upper bound is exclusive


def run_trial(values: dict, base: dict, sweep_dict: dict, sweep_dir: str) -> None:
    """The Tune trainable: fit one Ray Train run of the trainer, into the trial's directory in the
    sweep's storage (Tune's own trial directory is local to the node the trial runs on)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .checkpoint import set_aside_stale_ray_record
    from .failures import stopped_reason
    from .memory import fit_shortfall
    from .ray_train import make_trainer

    sweep = from_dict(SweepConfig, sweep_dict)
    trial_dir = Path(sweep_dir) / Path(tune.get_context().get_trial_dir()).name
    cfg = trial_config(base, values, sweep, trial_dir)
    out = trial_dir / TRIAL_RUN
    write_config(out, cfg)
    why = fit_shortfall(cfg)
    if why is not None:  # before any worker starts; the search hears of a failed trial
        raise RunStopped(f"{why} (scale.gpu_memory_gb x scale.gpus_per_worker)")
    set_aside_stale_ray_record(out)  # a trial resumed after the sweep was killed
    try:
        make_trainer(cfg, out, callbacks=[TuneReportCallback()]).fit()
    except Exception as exc:
        reason = stopped_reason(exc)
        if reason is None:
            raise
        raise RunStopped(reason) from None  # the sweep's display shows this line for the failed trial


def optuna_search(sweep: SweepConfig, params: list[Param], sweep_dir: Path, warm_start: Path | None = None):
    """Tune's OptunaSearch with seeded TPE over the space, its study in the sweep directory
    (sweep_plan.study_storage), seeded with another sweep's finished trials when `warm_start`
    names one (they enter the study as evaluated, and TPE proposes from them)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    points, rewards = warm_start_trials(warm_start, params) if warm_start else (None, None)
    return OptunaSearch(
        space={p.key: p.optuna() for p in params},
        metric="val_ppl",
        mode="min",
        sampler=optuna.samplers.TPESampler(seed=sweep.sweep.seed),
        study_name=sweep.sweep.name,
        storage=study_storage(sweep_dir),
        points_to_evaluate=points,
        evaluated_rewards=rewards,
    )


def tracking_callbacks(sweep: SweepConfig, sweep_dir: Path) -> list:
    """Ray Tune's logger callbacks for sweep.loggers, beside its JSON results (which the sweep's
    own tools read). Nothing leaves the machine unless the user set it up: W&B runs offline into
    the sweep directory unless an API key or a login is found, MLflow writes a SQLite file there
    unless MLFLOW_TRACKING_URI names a server."""
    from ray.tune.logger import JsonLoggerCallback, TBXLoggerCallback

    callbacks = [JsonLoggerCallback()]
    loggers, name = sweep.sweep.loggers, sweep.sweep.name
    if "tensorboard" in loggers:
        callbacks.append(TBXLoggerCallback())
    if "wandb" in loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        mode = "online" if _wandb_logged_in() else "offline"
        if mode == "offline":  # Ray's callback asks for a key unless the mode says offline
            os.environ.setdefault("WANDB_MODE", "offline")
        callbacks.append(WandbLoggerCallback(project=name, mode=mode, dir=str(sweep_dir), log_config=True))
    if "mlflow" in loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{sweep_dir / MLFLOW_DB}"
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name))
    return callbacks


def _wandb_logged_in() -> bool:
    """Whether W&B has a key: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _new_tuner(trainable, sweep: SweepConfig, params: list[Param], sweep_dir: Path, warm_start: Path | None):
    """A fresh Tune run: OptunaSearch (seeded TPE, its study in the sweep directory), or Tune's
    seeded grid/random generator when the space has grid entries (Optuna cannot take a grid beside
    sampled values); ASHA on val_ppl with tokens as its clock."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    settings, asha = sweep.sweep, sweep.asha
    scheduler = FIFOScheduler()
    if asha.enabled:
        scheduler = ASHAScheduler(
            time_attr="tokens",
            max_t=settings.tokens_per_trial,
            grace_period=asha.grace_period_tokens,
            reduction_factor=asha.reduction_factor,
        )
    concurrent = settings.max_concurrent_trials
    if has_grid(params):  # Tune ignores max_concurrent_trials for a generator
        search, concurrent = (
            BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrent),
            None,
        )
    else:
        search = optuna_search(sweep, params, sweep_dir, warm_start)
    tune_config = tune.TuneConfig(
        metric="val_ppl",
        mode="min",
        search_alg=search,
        scheduler=scheduler,
        num_samples=settings.num_samples,
        max_concurrent_trials=concurrent,
    )
    grid = {p.key: tune_domain(p) for p in params} if has_grid(params) else {}  # else Optuna's space
    return tune.Tuner(
        trainable,
        param_space=grid,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=str(sweep_dir.parent),
            verbose=0,
            callbacks=[_display_callback(), *tracking_callbacks(sweep, sweep_dir)],
        ),
    )


def _record_sweep(sweep_dir: Path, path: str | Path, overrides: list[str], params: list[Param]) -> None:
    """The sweep file (overrides applied) and the space as this sweep ran them, for export and report."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    effective = yaml.safe_dump(effective_sweep(path, overrides), sort_keys=False)
    (sweep_dir / SWEEP_FILE).write_text(f"# {path} with {list(overrides)}\n" + effective)
    space = {k: v for p in params for k, v in p.to_yaml().items()}
    (sweep_dir / SPACE_FILE).write_text(yaml.safe_dump({"params": space}, sort_keys=False))


class _Watch:
    """Tune's trials as the sweep's display (progress.SweepProgress) shows them."""

    def __init__(self, progress, base: dict, sweep: SweepConfig, sweep_dir: Path):
        self.progress, self.base, self.sweep, self.sweep_dir = progress, base, sweep, sweep_dir
        self.budgets: dict[str, int] = {}

    def states(self, trials, ended: tuple[str, str] | None = None) -> dict[str, tuple[str, int, float]]:
        """Every trial's (status, tokens, val ppl); `ended` = (trial id, "complete" or "error") for the
        trial a callback reports on, which Tune marks as ended only after its callbacks ran."""
        out = {}
        for t in trials:
            last = t.last_result or {}
            tokens, ppl = last.get("tokens", 0), last.get("val_ppl", float("inf"))
            if t.trial_id not in self.budgets:
                self.budgets[t.trial_id] = trial_budget(self.base, t.config, self.sweep)
            how = ended[1] if ended and ended[0] == t.trial_id else t.status
            status = {"RUNNING": "running", "PAUSED": "running", "ERROR": "failed", "error": "failed"}.get(
                how, "pending"
            )
            if how in ("TERMINATED", "complete"):
                status = "completed" if tokens >= self.budgets[t.trial_id] else "stopped early"
            if status == "running":  # Tune hears of evaluations only; the trial's log says more
                tokens = max(tokens, self.logged_tokens(t))
            out[t.trial_id] = (status, tokens, ppl)
        return out

    def logged_tokens(self, trial) -> int:
        """The tokens in the last row of a running trial's metrics.jsonl (it logs every few steps)."""
        path = self.sweep_dir / Path(trial.local_path).name / TRIAL_RUN / METRICS_FILE
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                lines = f.read().split(b"\n")[:-1]  # the piece after the last newline is unfinished
            return int(json.loads(lines[-1])["tokens"]) if lines else 0
        except (OSError, ValueError, KeyError, IndexError):  # not there yet, or a line cut in two
            return 0

    def ended(self, trials, trial, how: str) -> None:
        states = self.states(trials, (trial.trial_id, how))
        status, tokens, ppl = states[trial.trial_id]
        if status == "completed":
            text = f"completed: val ppl {ppl:.2f} after {tokens:,} tokens"
        elif status == "stopped early":
            text = (
                f"stopped early by ASHA at {tokens:,} tokens: val ppl {ppl:.2f} is not in the best "
                f"1/{self.sweep.asha.reduction_factor} at that rung"
            )
        else:
            text = f"failed: {_last_error_line(trial)} (see {self.sweep_dir / Path(trial.local_path).name})"
        self.progress.event(f"trial {trial.trial_id} {text}")
        self.progress.update(states, force=True)


def _last_error_line(trial) -> str:
    """The last line of the error Tune recorded for a failed trial (its local copy: the one in the
    sweep's storage may not be written yet when the callback runs)."""
    path = Path(trial.error_file) if trial.error_file else None
    text = path.read_text() if path and path.exists() else str(trial.get_error() or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error text"


# The live sweep's _Watch. Tune pickles its callbacks with the tuner (to restore a sweep), so the
# callback holds no display itself: it finds this one, and unpickles as a fresh callback.
_LIVE: list[_Watch] = []


def _display_callback():
    """The Tune callback that drives the live sweep's display."""
    from ray import tune

    class SweepDisplay(tune.Callback):
        def __reduce__(self):
            return _display_callback, ()

        def on_step_end(self, iteration, trials, **info):
            for watch in _LIVE:
                watch.progress.update(watch.states(trials))

        def on_trial_complete(self, iteration, trials, trial, **info):
            for watch in _LIVE:
                watch.ended(trials, trial, "complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            for watch in _LIVE:
                watch.ended(trials, trial, "error")

    return SweepDisplay()


def run_sweep(path: str | Path, overrides: list[str] = (), warm_start: str | Path | None = None) -> Path:
    """Run (or resume) the sweep; write leaderboard.md, best.yaml and the report; return its directory."""
    from ray import tune

    from .data import prepare
    from .export import export
    from .progress import SweepProgress, console_to_log
    from .ray_session import LeakedGroups, check_resources, start_ray
    from .report import write_report

    sweep, base, params = load_sweep(path, overrides)
    if warm_start is not None:  # checked before any cluster starts
        if has_grid(params):
            raise ConfigError("--warm-start", "a space with grid entries is run by Tune's grid, not Optuna")
        warm_start_trials(warm_start, params)
    settings = sweep.sweep
    sweep_dir = Path(settings.storage_path).resolve() / settings.name
    trials = num_trials(sweep, params)
    asha = sweep.asha
    print(
        f"{settings.name}: {trials} trials of {settings.tokens_per_trial:,} tokens, "
        f"{settings.max_concurrent_trials} at a time, "
        + (
            f"ASHA from {asha.grace_period_tokens:,} tokens (factor {asha.reduction_factor})"
            if asha.enabled
            else "no early stopping"
        )
        + f"; Ray's own messages go to {sweep_dir / RAY_LOG}",
        file=sys.stderr,
        flush=True,
    )
    # Data, tokenizer and packed sequences once, here, rather than by concurrent trials racing
    # on the same cache (the cache must be on storage every node sees, as for any Ray run).
    prepare(from_dict(Config, base).data)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with console_to_log(sweep_dir / RAY_LOG) as console:
        progress = SweepProgress(settings.name, trials, settings.tokens_per_trial, console)
        progress.write(f"{settings.name}: starting Ray")
        start_ray(sweep.trial.scale.address)
        check_resources(sweep.trial.scale, extra_cpu=TRIAL_CPU)  # one trial must fit, or Tune waits forever
        trial = tune.with_parameters(
            run_trial, base=base, sweep_dict=dataclasses.asdict(sweep), sweep_dir=str(sweep_dir)
        )
        trainable = tune.with_resources(trial, {"cpu": TRIAL_CPU})
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the trackers are sweep.loggers alone
        if tune.Tuner.can_restore(str(sweep_dir)):
            progress.write(f"{settings.name}: resuming; finished trials are not run again")
            tuner = tune.Tuner.restore(
                str(sweep_dir), trainable=trainable, resume_errored=False, restart_errored=False
            )
        else:
            _record_sweep(sweep_dir, path, overrides, params)
            tuner = _new_tuner(trainable, sweep, params, sweep_dir, warm_start and Path(warm_start))
        _LIVE[:] = [_Watch(progress, base, sweep, sweep_dir)]
        try:
            with LeakedGroups(sweep.trial.scale):
                tuner.fit()
        finally:
            _LIVE.clear()
            progress.close()
    rows = leaderboard(sweep_dir)
    (sweep_dir / LEADERBOARD_FILE).write_text(leaderboard_markdown(rows))
    if any(r["status"] != "failed" and r["val_ppl"] < float("inf") for r in rows):  # else nothing to pick
        export(sweep_dir, sweep_dir / BEST_FILE)
    write_report(sweep_dir, sweep_dir / REPORT_DIR)
    return sweep_dir
