"""`loqt-ray export`: a sweep's best trial as a production training config, with where it came
from, what the sweep's production section changed, and whether it fits its GPU."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import yaml

from .config import (
    MODEL_DEFAULTS,
    PATH_FIELDS,
    Config,
    ConfigError,
    from_dict,
    load_config,
    path_value,
    read_yaml,
)
from .leaderboard import leaderboard
from .rundir import SWEEP_FILE
from .sweep_plan import production_config


def _flatten(data: dict, prefix: str = "") -> dict:
    """A config as {dotted.key: value}, tuples as lists (as YAML holds them)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _defaults_moved(trial: dict, cfg: Config) -> dict:
    """The unset fields whose default the production section moved: the winner trained at its
    model's default, the production run takes its own model's, and the export says so."""
    ran, moved = from_dict(Config, trial), {}
    for key, settle in MODEL_DEFAULTS.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) is None and settle(ran) != settle(cfg):
            moved[key] = [_default(settle, ran), _default(settle, cfg)]
    return moved


def _default(settle, cfg: Config) -> str:
    return f"{settle(cfg):g} ({cfg.model.path or f'the {cfg.model.size} model'}'s default)"


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
    changed = {k: [was.get(k), now[k]] for k in now if was.get(k) != now[k]} | _defaults_moved(trial, cfg)
    data["provenance"] = {
        "sweep": str(sweep_dir),
        "trial": best["trial"],
        "val_ppl": best["val_ppl"],
        "tokens": best["tokens"],
        "params": best["params"],
        "sweep_sha256": hashlib.sha256(sweep_file.read_bytes()).hexdigest(),
        # what the production section (and loqt.rank_fraction on the new model) changed
        "changed": changed,
    }
    Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def describe(path: Path) -> str:
    """What an export wrote: the best trial, what production changed, and whether the run fits."""
    from . import memory

    cfg, p = load_config(path), read_yaml(path)["provenance"]
    lines = [
        f"wrote {path}: trial {p['trial']} val_ppl {p['val_ppl']:.2f} after {p['tokens']:,} tokens",
        "changed from the trial's config by the sweep's production section:",
    ]
    for key, (was, now) in p["changed"].items():
        why = ""
        if key == "loqt.rank" and cfg.loqt.rank_fraction is not None:
            why = f"  (loqt.rank_fraction {cfg.loqt.rank_fraction:g} of this model's hidden size)"
        lines.append(f"  {key}: {was} -> {now}{why}")
    peak = memory.trainer_estimate(cfg).peak / memory.GIB
    at = f"micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}"
    gib = cfg.scale.gpu_memory_gb
    if gib is None:
        lines.append(
            f"memory: peak {peak:.1f} GiB per worker at {at}; set scale.gpu_memory_gb to check it fits"
        )
        return "\n".join(lines)
    largest, _ = memory.largest_trainer_batch(cfg, gib)
    lines.append(
        f"memory on a {gib:g} GiB GPU (scale.gpu_memory_gb): peak {peak:.1f} GiB per worker at {at}: "
        f"{'fits' if peak <= gib else 'does NOT fit'}; the largest micro-batch that fits is {largest}"
    )
    return "\n".join(lines)
