"""`loqt-ray report SWEEP_DIR`: plots and a markdown summary of a sweep, from its files alone.

Writes into the report directory:
  val_ppl.png              validation perplexity against tokens seen, one line per trial;
                           trials ASHA stopped early end in an x, failed ones in red
  tradeoff.png             val ppl against each trial's peak memory and tokens/s
  lr_scale.png             val ppl over the trials' lr and lora_alpha, when both were searched
  importances.png          Optuna PED-ANOVA parameter importances
  parallel_coordinates.png Optuna parallel coordinates of the sampled values
  summary.md               counts, tokens trained, the best trial and the leaderboard

Importances compare trials at one token count, the most that every trial that ran
reached (with ASHA: the first rung), so a stopped trial is judged on what it saw.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .config import ConfigError, read_yaml
from .leaderboard import format_value, leaderboard, leaderboard_markdown
from .rundir import REPORT_DIR, SPACE_FILE, SWEEP_FILE
from .search_space import parse_space

MIN_TRIALS_FOR_IMPORTANCE = 3


def _plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for rank, r in enumerate(rows):
        if not r["curve"]:
            continue
        tokens, ppl = zip(*r["curve"], strict=True)
        style = {
            "completed": dict(ls="-", marker="o"),
            "stopped early": dict(ls="--", marker="."),
            "failed": dict(ls=":", marker=".", color="tab:red"),
        }[r["status"]]
        (line,) = ax.plot(
            tokens, ppl, lw=2.5 if rank == 0 else 1.2, ms=4, label=f"{r['trial']} ({r['status']})", **style
        )
        if r["status"] != "completed":
            ax.plot(tokens[-1], ppl[-1], "x", ms=10, mew=2, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity per trial (x: stopped early or failed; bold: best)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Val ppl against what each trial cost, peak memory and tokens/s, side by side: a slightly
    worse trial can be much cheaper. Trials stopped early are judged at the tokens they reached."""
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r["curve"] and r["memory_gib"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in (
        (axes[0], "memory_gib", "peak memory (GiB)"),
        (axes[1], "tokens_per_s", "tokens/s"),
    ):
        for r in ran:
            marker = "o" if r["status"] == "completed" else "x"
            ax.scatter(r[key], r["val_ppl"], marker=marker, s=60 if r is rows[0] else 30)
            ax.annotate(
                r["trial"], (r[key], r["val_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation perplexity (o: completed, x: stopped early)")
    axes[0].set_yscale("log")
    fig.suptitle("What each trial reached against what it cost")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


LR_SCALE = ("optim.lr", "loqt.lora_alpha")  # the two knobs the report maps together


def _plot_lr_scale(rows: list[dict], path: Path) -> bool:
    """Val ppl over the trials' (lr, lora_alpha), both axes log: the two knobs are separate, and
    the map shows whether their best lies along a line or at a point. False when the sweep did not
    search both."""
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r["curve"] and all(k in r["params"] for k in LR_SCALE)]
    if len(ran) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(
        [r["params"][LR_SCALE[0]] for r in ran],
        [r["params"][LR_SCALE[1]] for r in ran],
        c=[r["val_ppl"] for r in ran],
        cmap="viridis_r",
        s=[60 if r["status"] == "completed" else 25 for r in ran],
        norm="log",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(LR_SCALE[0])
    ax.set_ylabel(LR_SCALE[1])
    ax.set_title("val ppl per trial (large: completed; small: stopped at a rung)")
    fig.colorbar(points, ax=ax, label="validation perplexity")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _study_at_common_tokens(rows: list[dict], space_path: Path):
    """An Optuna study of every trial's val ppl at the most tokens all of them reached."""
    import optuna

    ran = [r for r in rows if r["curve"]]
    if len(ran) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, 0
    common = min(r["curve"][-1][0] for r in ran)
    distributions = {p.key: p.optuna() for p in parse_space(space_path)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for r in ran:
        value = [ppl for tokens, ppl in r["curve"] if tokens <= common][-1]
        params = {k: v for k, v in r["params"].items() if k in distributions}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions={k: distributions[k] for k in params}, value=value
            )
        )
    return study, common


def _summary_lines(rows: list[dict], sweep: dict, name: str) -> list[str]:
    """Counts, tokens against the no-stopping budget, the best trial and the leaderboard."""
    budget = sweep.get("tokens_per_trial", 0) * len(rows)
    trained = sum(r["tokens"] for r in rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped early", "failed")}
    tokens = f"Tokens trained: {trained:,}."
    if budget:
        tokens = f"Tokens trained: {trained:,} of {budget:,} without early stopping ({trained / budget:.0%})."
    best = rows[0]
    values = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(best["params"].items()))
    best_line = f"Best: trial {best['trial']}, val ppl {best['val_ppl']:.2f} after {best['tokens']:,} tokens"
    return [
        f"# Sweep {sweep.get('name', name)}",
        "",
        f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
        tokens,
        "",
        f"{best_line}, with {values}.",
        "",
        "![validation perplexity](val_ppl.png)",
        "",
        "## Quality against cost",
        "",
        "| trial | status | val ppl | peak memory GiB | tokens/s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['trial']} | {r['status']} | {r['val_ppl']:.2f} | {r['memory_gib']:.2f} | "
            f"{r['tokens_per_s']:.0f} |"
            for r in rows
            if r["memory_gib"] is not None
        ),
        "",
        "![quality against cost](tradeoff.png)",
        "",
        "## Leaderboard",
        "",
        leaderboard_markdown(rows),
    ]


def _importance_lines(study, common: int, out: Path) -> list[str]:
    """PED-ANOVA importances as a table, and the importance and parallel-coordinates plots."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_parallel_coordinate, plot_param_importances

    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots = {
            "importances": plot_param_importances(study, evaluator=evaluator),
            "parallel_coordinates": plot_parallel_coordinate(study),
        }
    for name, ax in plots.items():
        ax.figure.set_size_inches(12, 5)  # room for one axis per parameter
        ax.figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
    table = [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    return [
        "",
        f"## Parameter importances (PED-ANOVA, val ppl at {common:,} tokens)",
        "",
        "| parameter | importance |",
        "|---|---|",
        *table,
        "",
        "![importances](importances.png)",
        "",
        "![parallel coordinates](parallel_coordinates.png)",
    ]


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the plots and summary.md; return the summary's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SWEEP_FILE).exists():
        raise ConfigError(str(sweep_dir), "not a sweep directory (no sweep.yaml)")
    rows = leaderboard(sweep_dir)
    if not rows:
        raise ConfigError(str(sweep_dir), "no trial has started yet")
    out = Path(out_dir) if out_dir else sweep_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    _plot_curves(rows, out / "val_ppl.png")
    _plot_tradeoff(rows, out / "tradeoff.png")
    lr_scale = _plot_lr_scale(rows, out / "lr_scale.png")
    sweep = read_yaml(sweep_dir / SWEEP_FILE).get("sweep") or {}
    lines = _summary_lines(rows, sweep, sweep_dir.name)
    if lr_scale:
        lines += ["", "## The lr and the scale", "", "![val ppl over lr and lora_alpha](lr_scale.png)"]
    study, common = None, 0
    if (sweep_dir / SPACE_FILE).exists():
        study, common = _study_at_common_tokens(rows, sweep_dir / SPACE_FILE)
    if study is None:
        lines += [
            "",
            f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} trials that reported.",
        ]
    else:
        lines += _importance_lines(study, common, out)
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary
