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
import json
import re
from pathlib import Path

import yaml

from .config import (Config, ConfigError, DataConfig, SweepConfig, apply_override, from_dict, read_yaml, rooted,
                     validate)
from .search_space import Param, apply_params, check_space, parse_space

TRIAL_RUN = "train"  # the Ray Train run inside each trial directory
SPACE_FILE = "search_space.yaml"  # the space as the sweep ran it, for the report


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
    s, a = sweep.sweep, sweep.asha
    for key in ("num_samples", "max_concurrent_trials", "tokens_per_trial", "eval_every_tokens"):
        if getattr(s, key) < 1:
            raise ConfigError(f"sweep.{key}", f"must be >= 1 (got {getattr(s, key)})")
    if a.reduction_factor < 2:
        raise ConfigError("asha.reduction_factor", f"must be >= 2 (got {a.reduction_factor})")
    if not 0 < a.grace_period_tokens <= s.tokens_per_trial:
        raise ConfigError("asha.grace_period_tokens", f"must be in (0, sweep.tokens_per_trial] (got {a.grace_period_tokens})")
    base = data.get("trial") or {}
    validate(sweep.trial)
    tokens_per_step = _tokens_per_step(sweep.trial)
    if s.eval_every_tokens < tokens_per_step or s.tokens_per_trial < s.eval_every_tokens:
        raise ConfigError("sweep.eval_every_tokens", f"must lie between one step's tokens ({tokens_per_step}) and "
                          f"sweep.tokens_per_trial ({s.tokens_per_trial}) (got {s.eval_every_tokens})")
    space_path = Path(s.search_space)
    if not space_path.is_absolute() and not space_path.exists():
        space_path = Path(path).resolve().parent.parent / s.search_space  # relative to the repository
    params = parse_space(space_path)
    check_space(params, base, space_path)
    production_config(base, sweep.production)  # the export must be possible before any trial runs
    s.storage_path = rooted(s.storage_path)
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    make_trainer(cfg, out, None, callbacks=[TuneReportCallback()]).fit()


def run_sweep(path: str | Path, overrides: list[str] = ()) -> Path:
    """Run (or resume) the sweep; write leaderboard.md and best.yaml; return the sweep directory."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .data import prepare
    from .launch import start_ray
    from .report import write_report

    sweep, base, params = load_sweep(path, overrides)
    s = sweep.sweep
    sweep_dir = Path(s.storage_path).resolve() / s.name
    effective = effective_sweep(path, overrides)
    # Data, tokenizer and packed sequences once, here, rather than by concurrent trials racing
    # on the same cache (the cache must be on storage every node sees, as for any Ray run).
    prepare(from_dict(Config, base).data)
    start_ray(sweep.trial.scale.address)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep_dict=dataclasses.asdict(sweep)), {"cpu": 0.1})
    if tune.Tuner.can_restore(str(sweep_dir)):
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.yaml").write_text(f"# {path} with {list(overrides)}\n"
                                              + yaml.safe_dump(effective, sort_keys=False))
        space = {k: v for p in params for k, v in p.to_yaml().items()}
        (sweep_dir / SPACE_FILE).write_text(yaml.safe_dump({"params": space}, sort_keys=False))
        scheduler = (ASHAScheduler(time_attr="tokens", max_t=s.tokens_per_trial, grace_period=sweep.asha.grace_period_tokens,
                                   reduction_factor=sweep.asha.reduction_factor)
                     if sweep.asha.enabled else FIFOScheduler())
        search = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
        tuner = tune.Tuner(
            trainable, param_space={p.key: p.tune() for p in params},
            tune_config=tune.TuneConfig(metric="val_ppl", mode="min", search_alg=search, scheduler=scheduler,
                                        num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent_trials),
            run_config=tune.RunConfig(name=s.name, storage_path=str(sweep_dir.parent), verbose=0))
    tuner.fit()
    rows = leaderboard(sweep_dir)
    (sweep_dir / "leaderboard.md").write_text(leaderboard_markdown(rows))
    export(sweep_dir, sweep_dir / "best.yaml")
    write_report(sweep_dir, sweep_dir / "report")
    return sweep_dir


def leaderboard(sweep_dir: Path) -> list[dict]:
    """One row per trial from its own files, best validation perplexity first."""
    rows = []
    for config_path in sorted(Path(sweep_dir).glob(f"*/{TRIAL_RUN}/config.yaml")):
        trial_dir = config_path.parent.parent
        metrics = [json.loads(l) for l in (config_path.parent / "metrics.jsonl").read_text().splitlines()
                   if l.strip()] if (config_path.parent / "metrics.jsonl").exists() else []
        evals = [m for m in metrics if "val_ppl" in m]
        cfg = yaml.safe_load(config_path.read_text())
        finished = bool(evals) and evals[-1]["step"] == cfg["train"]["steps"]
        error = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
        rows.append({
            "trial": (re.search(r"_([0-9a-f]{8})_\d+_", trial_dir.name) or re.match(r"(.*)", trial_dir.name)).group(1),
            "dir": str(trial_dir),
            "status": "failed" if error else "completed" if finished else "stopped early",
            "tokens": evals[-1]["tokens"] if evals else 0,
            "val_ppl": evals[-1]["val_ppl"] if evals else float("inf"),
            "curve": [(m["tokens"], m["val_ppl"]) for m in evals],
            "params": json.loads((trial_dir / "params.json").read_text()) if (trial_dir / "params.json").exists() else {},
            "config": cfg,
        })
    return sorted(rows, key=lambda r: (r["status"] == "failed", r["val_ppl"]))


def leaderboard_markdown(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    lines = ["| trial | status | tokens | val ppl | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        values = [f"{r['params'][k]:.4g}" if isinstance(r["params"].get(k), float) else str(r["params"].get(k, ""))
                  for k in keys]
        lines.append(f"| {r['trial']} | {r['status']} | {r['tokens']:,} | {r['val_ppl']:.2f} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def export(sweep_dir: str | Path, out: str | Path) -> dict:
    """Write the best trial's settings applied to the sweep's production section, with provenance."""
    sweep_dir = Path(sweep_dir)
    sweep_file = sweep_dir / "sweep.yaml"
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
    trial["data"]["data_dir"] = ((sweep.get("trial") or {}).get("data") or {}).get("data_dir", DataConfig.data_dir)
    cfg = production_config(trial, sweep.get("production") or {})
    data = cfg.to_dict()
    data["provenance"] = {"sweep": str(sweep_dir), "trial": best["trial"], "val_ppl": best["val_ppl"],
                          "tokens": best["tokens"], "params": best["params"],
                          "sweep_sha256": hashlib.sha256(sweep_file.read_bytes()).hexdigest()}
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return data
