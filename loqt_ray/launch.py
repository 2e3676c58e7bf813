"""Run a training job: the run directory, metrics.jsonl and a progress bar around trainer.train."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from tqdm import tqdm

from .config import Config, ConfigError
from .trainer import train


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.name


def run_training(cfg: Config) -> dict:
    out = run_dir(cfg)
    if (out / "metrics.jsonl").exists():
        raise ConfigError("train.name", f"run directory {out} already holds a run; choose another name")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    bar = tqdm(total=cfg.train.steps, desc=cfg.train.name, unit="step", dynamic_ncols=True)
    with open(out / "metrics.jsonl", "a") as log:
        def report(metrics: dict) -> None:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.update(metrics["step"] - bar.n)
            shown = {"loss": f"{metrics['train_loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
            if "val_ppl" in metrics:
                shown["ppl"] = f"{metrics['val_ppl']:.1f}"
            bar.set_postfix(shown)

        final = train(cfg, report)
    bar.close()
    return final
