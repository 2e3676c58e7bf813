"""A sweep before anything runs: its file loaded and validated, its trials' and production's
configs, its cost with and without early stopping, and the dry run that prints them. No Ray."""

from __future__ import annotations

import copy
from pathlib import Path

from .config import (
    Config,
    ConfigError,
    SweepConfig,
    anchor_paths,
    apply_override,
    from_dict,
    make_config,
    read_yaml,
    rooted,
)
from .rundir import OPTUNA_JOURNAL, SPACE_FILE, SWEEP_FILE, TRIAL_RUN
from .search_space import Param, apply_params, check_space, grid_size, parse_space

# The Tune trial that drives a trial's Ray Train run; its workers ask for the rest. Small, so that
# the trials Tune has started never hold the CPUs a worker group needs (on a cluster that lost a
# node, two 0.1-CPU trials left 0.8 of the last CPU and neither could start its 0.9-CPU worker).
TRIAL_CPU = 0.01
TRIAL_LOG_EVERY = 10  # steps between a trial's rows in metrics.jsonl (what the status line counts)


def effective_sweep(path: str | Path, overrides: list[str] = ()) -> dict:
    """The sweep file as read, with its --set overrides applied."""
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, dict, list[Param]]:
    """The validated sweep, its trial config as a dict with absolute paths (every trial's base)
    and the search space."""
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
    trial = make_config(base)
    per_step = tokens_per_step(trial)
    if settings.eval_every_tokens < per_step or settings.tokens_per_trial < settings.eval_every_tokens:
        raise ConfigError(
            "sweep.eval_every_tokens",
            f"must lie between one step's tokens ({per_step}) and "
            f"sweep.tokens_per_trial ({settings.tokens_per_trial}) (got {settings.eval_every_tokens})",
        )
    space_path = Path(settings.search_space)
    if not space_path.is_absolute() and not space_path.exists():
        space_path = Path(path).resolve().parent.parent / settings.search_space  # relative to the repository
    params = parse_space(space_path)
    check_space(params, base, space_path)
    production_config(base, sweep.production)  # the export must be possible before any trial runs
    settings.storage_path = rooted(settings.storage_path)
    sweep.trial = trial
    return sweep, anchor_paths(base), params  # absolute: the trials run elsewhere (config.HOME_ENV)


def tokens_per_step(cfg: Config) -> int:
    return cfg.sequences_per_step() * cfg.scale.num_workers * cfg.data.seq_len


def trial_config(base: dict, values: dict, sweep: SweepConfig, trial_dir: Path) -> Config:
    """One trial's training config: sampled values, the token budget in steps, its run directory
    inside the trial's. It evaluates (an ASHA rung) and checkpoints every eval_every_tokens, keeping
    the last checkpoint, so a sweep interrupted mid-trial goes on from the trial's last rung; it
    logs every few steps, which the sweep's status line counts tokens by."""
    per_step = tokens_per_step(apply_params(base, values))
    every = max(1, sweep.sweep.eval_every_tokens // per_step)
    data = copy.deepcopy(base)
    data["train"] = {
        **(data.get("train") or {}),
        "steps": max(1, sweep.sweep.tokens_per_trial // per_step),
        "eval_every": every,
        "log_every": min(every, TRIAL_LOG_EVERY),
        "output_dir": str(trial_dir),
        "name": TRIAL_RUN,
        "checkpoint_every": every,
        "keep_checkpoints": 1,
        "stop_at_step": None,
    }
    return apply_params(data, values)


def production_config(trial: dict, production: dict) -> Config:
    data = copy.deepcopy(trial)
    for section, values in production.items():
        if not isinstance(values, dict):
            raise ConfigError(f"production.{section}", "must be a mapping of fields")
        data.setdefault(section, {}).update(values)
    try:
        return make_config(data)
    except ConfigError as exc:
        raise ConfigError(f"production.{exc.field}", str(exc).split(": ", 1)[1]) from None


def has_grid(params: list[Param]) -> bool:
    return any(p.kind == "grid" for p in params)


def num_trials(sweep: SweepConfig, params: list[Param]) -> int:
    return sweep.sweep.num_samples * grid_size(params)


def asha_rungs(sweep: SweepConfig) -> list[int]:
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
    rungs, factor = asha_rungs(sweep), sweep.asha.reduction_factor
    segments = zip(rungs, rungs[1:], strict=False)  # the tokens between one rung and the next
    return round(trials * (rungs[0] + sum((b - a) / factor ** (k + 1) for k, (a, b) in enumerate(segments))))


def trial_budget(base: dict, values: dict, sweep: SweepConfig) -> int:
    """The tokens a trial trains when no one stops it (whole steps of its own batch)."""
    per_step = tokens_per_step(apply_params(base, values))
    return max(1, sweep.sweep.tokens_per_trial // per_step) * per_step


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
    per_step = tokens_per_step(sweep.trial)
    search = "Tune's grid, other entries drawn at random" if has_grid(params) else "Optuna TPE"
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
            f"{', '.join(f'{r:,}' for r in asha_rungs(sweep))}): about {estimate:,} "
            f"({estimate / (trials * budget):.2f}x) if 1 in {asha.reduction_factor} passes each rung "
            "(the first trials at a rung always pass, so somewhat more)"
        )
    lines += [_resources_line(sweep), "dry run: nothing started, nothing written"]
    return "\n".join(lines)


def study_storage(sweep_dir: Path):
    """The Optuna storage of a sweep's study: a journal file in its directory, which
    optuna-dashboard and optuna.load_study open while the sweep runs and after."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(sweep_dir) / OPTUNA_JOURNAL)))


def warm_start_trials(other: str | Path, params: list[Param]) -> tuple[list[dict], list[float]]:
    """Another sweep's finished trials (their settings and val ppl, from its Optuna study), to
    seed a sweep of the same search space with."""
    import optuna

    other = Path(other)
    if not (other / SWEEP_FILE).is_file() or not (other / OPTUNA_JOURNAL).is_file():
        raise ConfigError("--warm-start", f"{other} is not a sweep directory with an Optuna study")
    theirs = {p.key: (p.kind, p.values) for p in parse_space(other / SPACE_FILE)}
    if theirs != {p.key: (p.kind, p.values) for p in params}:
        raise ConfigError("--warm-start", f"{other} searched another space ({other / SPACE_FILE})")
    name = (read_yaml(other / SWEEP_FILE).get("sweep") or {}).get("name", "sweep")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=study_storage(other))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not done:
        raise ConfigError("--warm-start", f"{other}'s study has no finished trial")
    return [dict(t.params) for t in done], [float(t.value) for t in done]
