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
from pathlib import Path

import yaml

from . import results
from .config import (
    Config,
    ConfigError,
    DataConfig,
    SweepConfig,
    apply_override,
    from_dict,
    read_yaml,
    rooted,
    validate,
)
from .results import BEST_FILE, LEADERBOARD_FILE, REPORT_DIR, SPACE_FILE, SWEEP_FILE, TRIAL_RUN, leaderboard
from .search_space import Param, apply_params, check_space, parse_space

TRIAL_CPU = 0.1  # the Tune trial that drives a trial's Ray Train run; its workers ask for the rest


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
    data_section = base.get("data") or {}
    base["data"] = {**data_section, "data_dir": rooted(data_section.get("data_dir", DataConfig.data_dir))}
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


def run_trial(values: dict, base: dict, sweep_dict: dict) -> None:
    """The Tune trainable: fit one Ray Train run of the trainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .launch import make_trainer

    sweep = from_dict(SweepConfig, sweep_dict)
    trial_dir = Path(tune.get_context().get_trial_dir())
    cfg = trial_config(base, values, sweep, trial_dir)
    out = trial_dir / TRIAL_RUN
    results.write_config(out, cfg)
    make_trainer(cfg, out, None, callbacks=[TuneReportCallback()]).fit()


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
    if any(p.kind == "grid" for p in params):  # Tune ignores max_concurrent_trials for a generator
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
        run_config=tune.RunConfig(name=settings.name, storage_path=str(sweep_dir.parent), verbose=0),
    )


def _record_sweep(sweep_dir: Path, path: str | Path, overrides: list[str], params: list[Param]) -> None:
    """The sweep file (overrides applied) and the space as this sweep ran them, for export and report."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    effective = yaml.safe_dump(effective_sweep(path, overrides), sort_keys=False)
    (sweep_dir / SWEEP_FILE).write_text(f"# {path} with {list(overrides)}\n" + effective)
    space = {k: v for p in params for k, v in p.to_yaml().items()}
    (sweep_dir / SPACE_FILE).write_text(yaml.safe_dump({"params": space}, sort_keys=False))


def run_sweep(path: str | Path, overrides: list[str] = ()) -> Path:
    """Run (or resume) the sweep; write leaderboard.md, best.yaml and the report; return its directory."""
    from ray import tune

    from .data import prepare
    from .launch import check_resources, start_ray
    from .report import write_report

    sweep, base, params = load_sweep(path, overrides)
    sweep_dir = Path(sweep.sweep.storage_path).resolve() / sweep.sweep.name
    # Data, tokenizer and packed sequences once, here, rather than by concurrent trials racing
    # on the same cache (the cache must be on storage every node sees, as for any Ray run).
    prepare(from_dict(Config, base).data)
    start_ray(sweep.trial.scale.address)
    check_resources(sweep.trial.scale, extra_cpu=TRIAL_CPU)  # one trial must fit, or Tune waits forever
    trial = tune.with_parameters(run_trial, base=base, sweep_dict=dataclasses.asdict(sweep))
    trainable = tune.with_resources(trial, {"cpu": TRIAL_CPU})
    if tune.Tuner.can_restore(str(sweep_dir)):
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_errored=False, restart_errored=False
        )
    else:
        _record_sweep(sweep_dir, path, overrides, params)
        tuner = _new_tuner(trainable, sweep, params, sweep_dir)
    tuner.fit()
    (sweep_dir / LEADERBOARD_FILE).write_text(results.leaderboard_markdown(leaderboard(sweep_dir)))
    export(sweep_dir, sweep_dir / BEST_FILE)
    write_report(sweep_dir, sweep_dir / REPORT_DIR)
    return sweep_dir


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
    trial["train"].update(output_dir="runs", name=f"{sweep.get('sweep', {}).get('name', 'sweep')}-best")
    # The data cache as the sweep file wrote it, not as $LOQT_RAY_HOME rooted it for the trials.
    trial["data"]["data_dir"] = ((sweep.get("trial") or {}).get("data") or {}).get(
        "data_dir", DataConfig.data_dir
    )
    cfg = production_config(trial, sweep.get("production") or {})
    data = cfg.to_dict()
    data["provenance"] = {
        "sweep": str(sweep_dir),
        "trial": best["trial"],
        "val_ppl": best["val_ppl"],
        "tokens": best["tokens"],
        "params": best["params"],
        "sweep_sha256": hashlib.sha256(sweep_file.read_bytes()).hexdigest(),
    }
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return data
