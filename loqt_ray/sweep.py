"""Ray Tune + Optuna + ASHA over LoQT settings; leaderboard and best-config export.

Each trial is a Tune function that fits a Ray Train TorchTrainer (Train V2) of the
trainer, its metrics forwarded with TuneReportCallback. Optuna's TPE (seeded)
proposes values from the search space; ASHA stops trials on validation
perplexity with tokens seen as its clock. A trial that fails (NaN loss, out of
memory) is recorded as failed and the sweep goes on. Rerunning the same command
resumes the sweep without rerunning finished trials.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
from pathlib import Path

import yaml

from . import results
from .config import (
    PATH_FIELDS,
    Config,
    ConfigError,
    RunStopped,
    SweepConfig,
    anchored,
    apply_override,
    from_dict,
    path_value,
    read_yaml,
    rooted,
    validate,
)
from .progress import Periodic
from .results import (
    BEST_FILE,
    LEADERBOARD_FILE,
    RAY_LOG,
    REPORT_DIR,
    SPACE_FILE,
    SWEEP_FILE,
    TRIAL_RUN,
    leaderboard,
)
from .search_space import Param, apply_params, check_space, grid_size, parse_space

# The Tune trial that drives a trial's Ray Train run; its workers ask for the rest. Small, so that
# the trials Tune has started never hold the CPUs a worker group needs (on a cluster that lost a
# node, two 0.1-CPU trials left 0.8 of the last CPU and neither could start its 0.9-CPU worker).
TRIAL_CPU = 0.01


def effective_sweep(path: str | Path, overrides: list[str] = ()) -> dict:
    """The sweep file as read, with its --set overrides applied."""
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, dict, list[Param]]:
    """The validated sweep, its trial config as a dict (every trial's base) and the search space."""
    data = effective_sweep(path, overrides)
    sweep = from_dict(SweepConfig, data)
    settings, asha = sweep.sweep, sweep.asha
    for key in ("num_samples", "max_concurrent_trials", "tokens_per_trial", "eval_every_tokens"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"sweep.{key}", f"must be >= 1 (got {getattr(settings, key)})")
    if asha.enabled and asha.reduction_factor < 2:
        raise ConfigError("asha.reduction_factor", f"must be >= 2 (got {asha.reduction_factor})")
    if asha.enabled and not 0 < asha.grace_period_tokens <= settings.tokens_per_trial:
        raise ConfigError(
            "asha.grace_period_tokens",
            f"must be in (0, sweep.tokens_per_trial] (got {asha.grace_period_tokens})",
        )
    base = data.get("trial") or {}
    validate(sweep.trial)
    tokens_per_step = _tokens_per_step(sweep.trial)
    if settings.eval_every_tokens < tokens_per_step or settings.tokens_per_trial < settings.eval_every_tokens:
        raise ConfigError(
            "sweep.eval_every_tokens",
            f"must lie between one step's tokens ({tokens_per_step}) and "
            f"sweep.tokens_per_trial ({settings.tokens_per_trial}) (got {settings.eval_every_tokens})",
        )
    space_path = Path(settings.search_space)
    if not space_path.is_absolute() and not space_path.exists():
        space_path = Path(path).resolve().parent.parent / settings.search_space  # relative to the repository
    params = parse_space(space_path)
    check_space(params, base, space_path)
    production_config(base, sweep.production)  # the export must be possible before any trial runs
    settings.storage_path = rooted(settings.storage_path)
    for name in PATH_FIELDS:  # absolute: the trials run elsewhere (see config.HOME_ENV)
        section, key = name.split(".")
        base[section] = {**(base.get(section) or {}), key: anchored(name, path_value(base, name))}
    return sweep, base, params


def _tokens_per_step(cfg: Config) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.scale.num_workers * cfg.data.seq_len


def trial_config(base: dict, values: dict, sweep: SweepConfig, trial_dir: Path) -> Config:
    """One trial's training config: sampled values, the token budget in steps, evaluation cadence."""
    cfg = apply_params(base, values)
    per_step = _tokens_per_step(cfg)
    cfg.train.steps = max(1, sweep.sweep.tokens_per_trial // per_step)
    cfg.train.eval_every = cfg.train.log_every = max(1, sweep.sweep.eval_every_tokens // per_step)
    cfg.train.output_dir, cfg.train.name = str(trial_dir), TRIAL_RUN
    cfg.train.checkpoint_every, cfg.train.stop_at_step = 0, None
    validate(cfg)
    return cfg


def production_config(trial: dict, production: dict) -> Config:
    data = copy.deepcopy(trial)
    for section, values in production.items():
        if not isinstance(values, dict):
            raise ConfigError(f"production.{section}", "must be a mapping of fields")
        data.setdefault(section, {}).update(values)
    try:
        cfg = from_dict(Config, data)
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"production.{exc.field}", str(exc).split(": ", 1)[1]) from None
    return cfg


def run_trial(values: dict, base: dict, sweep_dict: dict, sweep_dir: str) -> None:
    """The Tune trainable: fit one Ray Train run of the trainer, into the trial's directory in the
    sweep's storage (Tune's own trial directory is local to the node the trial runs on)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .launch import make_trainer, set_aside_stale_ray_record, stopped_reason

    sweep = from_dict(SweepConfig, sweep_dict)
    trial_dir = Path(sweep_dir) / Path(tune.get_context().get_trial_dir()).name
    cfg = trial_config(base, values, sweep, trial_dir)
    out = trial_dir / TRIAL_RUN
    results.write_config(out, cfg)
    set_aside_stale_ray_record(out)  # a trial resumed after the sweep was killed
    try:
        make_trainer(cfg, out, callbacks=[TuneReportCallback()]).fit()
    except Exception as exc:
        reason = stopped_reason(exc)
        if reason is None:
            raise
        raise RunStopped(reason) from None  # the sweep's display shows this line for the failed trial


def _has_grid(params: list[Param]) -> bool:
    return any(p.kind == "grid" for p in params)


def _new_tuner(trainable, sweep: SweepConfig, params: list[Param], sweep_dir: Path):
    """A fresh Tune run: OptunaSearch (seeded TPE), or Tune's seeded grid/random generator when the
    space has grid entries (Optuna cannot take a grid beside sampled values); ASHA on val_ppl with
    tokens as its clock."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

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
    if _has_grid(params):  # Tune ignores max_concurrent_trials for a generator
        search, concurrent = (
            BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrent),
            None,
        )
    else:
        search = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=settings.seed))
    tune_config = tune.TuneConfig(
        metric="val_ppl",
        mode="min",
        search_alg=search,
        scheduler=scheduler,
        num_samples=settings.num_samples,
        max_concurrent_trials=concurrent,
    )
    return tune.Tuner(
        trainable,
        param_space={p.key: p.tune() for p in params},
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=settings.name, storage_path=str(sweep_dir.parent), verbose=0, callbacks=[_display_callback()]
        ),
    )


def _record_sweep(sweep_dir: Path, path: str | Path, overrides: list[str], params: list[Param]) -> None:
    """The sweep file (overrides applied) and the space as this sweep ran them, for export and report."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    effective = yaml.safe_dump(effective_sweep(path, overrides), sort_keys=False)
    (sweep_dir / SWEEP_FILE).write_text(f"# {path} with {list(overrides)}\n" + effective)
    space = {k: v for p in params for k, v in p.to_yaml().items()}
    (sweep_dir / SPACE_FILE).write_text(yaml.safe_dump({"params": space}, sort_keys=False))


def num_trials(sweep: SweepConfig, params: list[Param]) -> int:
    return sweep.sweep.num_samples * grid_size(params)


def _asha_rungs(sweep: SweepConfig) -> list[int]:
    """The token counts at which ASHA compares trials (the last is the full budget)."""
    rung, budget = sweep.asha.grace_period_tokens, sweep.sweep.tokens_per_trial
    rungs = []
    while rung < budget:
        rungs.append(rung)
        rung *= sweep.asha.reduction_factor
    return rungs + [budget]


def asha_tokens_estimate(sweep: SweepConfig, trials: int) -> int:
    """Tokens trained if exactly 1 in reduction_factor trials passed each rung (synchronous successive
    halving); async ASHA lets more of the first trials through, so a live sweep trains somewhat more."""
    rungs, factor = _asha_rungs(sweep), sweep.asha.reduction_factor
    segments = zip(rungs, rungs[1:], strict=False)  # the tokens between one rung and the next
    return round(trials * (rungs[0] + sum((b - a) / factor ** (k + 1) for k, (a, b) in enumerate(segments))))


def _resources_line(sweep: SweepConfig) -> str:
    scale, concurrent = sweep.trial.scale, sweep.sweep.max_concurrent_trials
    cpus = TRIAL_CPU + scale.num_workers * scale.cpus_per_worker
    gpus = scale.num_workers * scale.gpus_per_worker if scale.use_gpu else 0
    per_worker = f"{scale.cpus_per_worker:g} CPU" + (f" + {scale.gpus_per_worker:g} GPU" if gpus else "")
    asked = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    together = f"{cpus * concurrent:g} CPU" + (f" + {gpus * concurrent:g} GPU" if gpus else "")
    return (
        f"each trial asks for {asked} ({TRIAL_CPU:g} CPU for its Tune driver, {scale.num_workers} "
        f"worker(s) of {per_worker}); {concurrent} at a time: {together}"
    )


def dry_run(path: str | Path, overrides: list[str] = ()) -> str:
    """What the sweep would run, validated, without starting Ray: space, trials, tokens, resources."""
    sweep, _, params = load_sweep(path, overrides)
    settings, asha = sweep.sweep, sweep.asha
    trials, budget = num_trials(sweep, params), settings.tokens_per_trial
    per_step = _tokens_per_step(sweep.trial)
    search = "Tune's grid, other entries drawn at random" if _has_grid(params) else "Optuna TPE"
    width = max(len(p.key) for p in params)
    lines = [f"sweep {settings.name}: {path}, search space {settings.search_space} (every corner valid)"]
    lines += [f"  {p.key:<{width}}  {p.kind} {list(p.values)}" for p in params]
    lines += [
        f"trials: {trials} (num_samples {settings.num_samples} x {grid_size(params)} grid points; {search}, "
        f"seed {settings.seed}), {settings.max_concurrent_trials} at a time",
        f"tokens per trial: {budget:,} ({budget // per_step} steps of {per_step:,}), an evaluation every "
        f"{settings.eval_every_tokens:,}",
        f"tokens without early stopping: {trials * budget:,}",
    ]
    if asha.enabled:
        estimate = asha_tokens_estimate(sweep, trials)
        lines.append(
            f"tokens with ASHA (grace {asha.grace_period_tokens:,}, factor {asha.reduction_factor}, rungs at "
            f"{', '.join(f'{r:,}' for r in _asha_rungs(sweep))}): about {estimate:,} "
            f"({estimate / (trials * budget):.2f}x) if 1 in {asha.reduction_factor} passes each rung "
            "(the first trials at a rung always pass, so somewhat more)"
        )
    lines += [_resources_line(sweep), "dry run: nothing started, nothing written"]
    return "\n".join(lines)


def _trial_budget(base: dict, values: dict, sweep: SweepConfig) -> int:
    """The tokens a trial trains when no one stops it (whole steps of its own batch)."""
    per_step = _tokens_per_step(apply_params(base, values))
    return max(1, sweep.sweep.tokens_per_trial // per_step) * per_step


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
                self.budgets[t.trial_id] = _trial_budget(self.base, t.config, self.sweep)
            how = ended[1] if ended and ended[0] == t.trial_id else t.status
            status = {"RUNNING": "running", "PAUSED": "running", "ERROR": "failed", "error": "failed"}.get(
                how, "pending"
            )
            if how in ("TERMINATED", "complete"):
                status = "completed" if tokens >= self.budgets[t.trial_id] else "stopped early"
            out[t.trial_id] = (status, tokens, ppl)
        return out

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


class _LeakedGroups(Periodic):
    """Frees the CPUs Ray Train sometimes leaks when Tune stops a trial. The trial's controller is
    aborted and stops its PlacementGroupCleaner, and now and then the workers' placement group
    outlives them (most early stops, on a loaded machine), holding its CPUs:
    later trials then wait for workers that never come and the sweep stalls. A group shaped like a
    trial's workers that no live actor uses, seen so in two checks `every_s` apart, is removed.
    The checks run in a thread of their own: Tune's loop is not guaranteed to turn while it waits."""

    every_s = 20.0

    def __init__(self, scale):
        from .launch import worker_resources

        self.shape = [worker_resources(scale)] * scale.num_workers
        self.suspects: set[str] = set()

    def tick(self) -> None:
        import ray
        from ray._raylet import PlacementGroupID
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


def run_sweep(path: str | Path, overrides: list[str] = ()) -> Path:
    """Run (or resume) the sweep; write leaderboard.md, best.yaml and the report; return its directory."""
    from ray import tune

    from .data import prepare
    from .launch import check_resources, start_ray
    from .progress import SweepProgress, console_to_log
    from .report import write_report

    sweep, base, params = load_sweep(path, overrides)
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
        if tune.Tuner.can_restore(str(sweep_dir)):
            progress.write(f"{settings.name}: resuming; finished trials are not run again")
            tuner = tune.Tuner.restore(
                str(sweep_dir), trainable=trainable, resume_errored=False, restart_errored=False
            )
        else:
            _record_sweep(sweep_dir, path, overrides, params)
            tuner = _new_tuner(trainable, sweep, params, sweep_dir)
        _LIVE[:] = [_Watch(progress, base, sweep, sweep_dir)]
        try:
            with _LeakedGroups(sweep.trial.scale):
                tuner.fit()
        finally:
            _LIVE.clear()
            progress.close()
    (sweep_dir / LEADERBOARD_FILE).write_text(results.leaderboard_markdown(leaderboard(sweep_dir)))
    export(sweep_dir, sweep_dir / BEST_FILE)
    write_report(sweep_dir, sweep_dir / REPORT_DIR)
    return sweep_dir


def _flatten(data: dict, prefix: str = "") -> dict:
    """A config as {dotted.key: value}, tuples as lists (as YAML holds them)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def export(sweep_dir: str | Path, out: str | Path) -> dict:
    """Write the best trial's settings applied to the sweep's production section, with provenance."""
    sweep_dir = Path(sweep_dir)
    sweep_file = sweep_dir / SWEEP_FILE
    if not sweep_file.exists():
        raise ConfigError(str(sweep_dir), "not a sweep directory (no sweep.yaml)")
    rows = [r for r in leaderboard(sweep_dir) if r["status"] != "failed" and r["val_ppl"] < float("inf")]
    if not rows:
        raise ConfigError(str(sweep_dir), "no trial reported a validation perplexity yet")
    best = rows[0]
    sweep = read_yaml(sweep_file)
    trial = copy.deepcopy(best["config"])
    # Paths as the sweep file wrote them, not as the trials ran them (absolute, see config.HOME_ENV).
    for name in PATH_FIELDS:
        section, key = name.split(".")
        trial[section][key] = path_value(sweep.get("trial") or {}, name)
    trial["train"].update(output_dir="runs", name=f"{sweep.get('sweep', {}).get('name', 'sweep')}-best")
    cfg = production_config(trial, sweep.get("production") or {})
    data = cfg.to_dict()
    was, now = _flatten(trial), _flatten(data)
    data["provenance"] = {
        "sweep": str(sweep_dir),
        "trial": best["trial"],
        "val_ppl": best["val_ppl"],
        "tokens": best["tokens"],
        "params": best["params"],
        "sweep_sha256": hashlib.sha256(sweep_file.read_bytes()).hexdigest(),
        # what the production section (and loqt.rank_fraction on the new model) changed
        "changed": {k: [was.get(k), now[k]] for k in now if was.get(k) != now[k]},
    }
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return data
