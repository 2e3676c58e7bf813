"""Early stopping against none at a search's size: which ASHA setting keeps the winner at the fewest tokens.

1. The demo sweep with `--num-samples` trials (16 by default) and no early stopping, an evaluation
   every `--eval-every-tokens`: every trial's whole validation curve and its timing.
2. Replays of those trials under Ray Tune's own ASHAScheduler for each grace period x reduction
   factor: the trials start in the sweep's order, `max_concurrent_trials` at a time, each report
   arriving after the time it took in step 1, so the scheduler sees results in the order a live
   sweep would; a stopped trial frees its slot for the next one. Async ASHA's decisions depend on
   that order, so each setting is also replayed with every trial's times jittered (40 orderings).
3. The setting that keeps the no-stopping best within `--tolerance` in the exact replay and in 95 %
   of the jittered ones, at the fewest tokens (mean over the orderings), run for real (a second
   sweep, same seed) to check the replay. (TPE's proposals after its 10 seeded start-up trials
   depend on what it saw, so the live sweep's last trials can differ from the replayed ones.)

Writes bench/results/asha.json: `runs` by name (each with `tokens`, `best_val_ppl`, `trials`), the
replay table and the chosen setting. Resumable: rerunning reuses the finished sweeps under --storage.

    .venv/bin/python bench/bench_asha.py [--num-samples 16] [--storage runs/bench_asha]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

from recipe import write_result

from loqt_ray.config import read_yaml
from loqt_ray.leaderboard import leaderboard
from loqt_ray.tune_run import run_sweep

GRACE_EVALS = (1, 2, 3, 4)  # grace periods in evaluations
FACTORS = (2, 3, 4)
JITTER, ORDERINGS = 0.3, 40  # replays per setting with trial times jittered
KEEP_SHARE = 0.95  # a setting keeps the winner if it does in this share of the orderings


def run(args, name: str, asha: str) -> dict:
    """One sweep (resumed if it ran before) and its rows and Tune results per trial."""
    start = time.time()
    sweep_dir = run_sweep(
        args.sweep,
        [
            f"sweep.name={name}",
            f"sweep.storage_path={Path(args.storage).resolve()}",
            f"sweep.num_samples={args.num_samples}",
            f"sweep.eval_every_tokens={args.eval_every_tokens}",
            *asha.split(),
        ],
    )
    rows = leaderboard(sweep_dir)
    return {
        "wall_s": round(time.time() - start),
        "best_val_ppl": rows[0]["val_ppl"],
        "best_params": rows[0]["params"],
        "best_trial": rows[0]["trial"],
        "tokens": sum(r["tokens"] for r in rows),
        "stopped": sum(r["status"] == "stopped early" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "trials": len(rows),
        "rows": rows,
    }


def _reports(row: dict) -> list[dict]:
    """A trial's Tune results (tokens, val_ppl, seconds since the trial started), in order."""
    lines = Path(row["dir"], "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def replay(
    rows: list[dict], grace: int, factor: int, max_t: int, slots: int, seed: int | None = None
) -> dict:
    """The no-stopping trials under Ray's ASHAScheduler, in the order a live sweep would report them;
    with a seed, each trial's times are scaled by a random factor (lognormal, sigma JITTER), as a
    loaded machine or another node would, which reorders the reports that reach a rung."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(
        time_attr="tokens", metric="val_ppl", mode="min", max_t=max_t, grace_period=grace,
        reduction_factor=factor,
    )  # fmt: skip
    order = sorted(rows, key=lambda r: int(Path(r["dir"]).name.split("_")[3]))  # Tune's trial index
    waiting = list(reversed(order))
    events: list[tuple[float, int, int]] = []  # (time, trial index, report index)
    rng = random.Random(seed)
    slow = [math.exp(rng.gauss(0, JITTER)) if seed is not None else 1.0 for _ in order]
    reports = {
        i: [{**x, "time_total_s": x["time_total_s"] * slow[i]} for x in _reports(r)]
        for i, r in enumerate(order)
    }
    trained = {}

    def start(now: float) -> None:
        row = waiting.pop()
        i = order.index(row)
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=row["trial"]))
        heapq.heappush(events, (now + reports[i][0]["time_total_s"], i, 0))

    for _ in range(min(slots, len(waiting))):
        start(0.0)
    while events:
        now, i, k = heapq.heappop(events)
        result = reports[i][k]
        trained[i] = result["tokens"]
        action = scheduler.on_trial_result(None, SimpleNamespace(trial_id=order[i]["trial"]), result)
        if action == TrialScheduler.CONTINUE and k + 1 < len(reports[i]):
            step = reports[i][k + 1]["time_total_s"] - result["time_total_s"]
            heapq.heappush(events, (now + step, i, k + 1))
        elif waiting:
            start(now)
    finals = {i: next(r["val_ppl"] for r in reports[i] if r["tokens"] == trained[i]) for i in trained}
    best = min(finals, key=finals.get)
    return {
        "grace_period_tokens": grace,
        "reduction_factor": factor,
        "tokens": sum(trained.values()),
        "best_val_ppl": finals[best],
        "best_trial": order[best]["trial"],
        "stopped": sum(t < max_t for t in trained.values()),
        "trials": len(trained),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="jobs/sweep.yaml")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--eval-every-tokens", type=int, default=20480)
    ap.add_argument("--tolerance", type=float, default=0.01, help="best val ppl within this of no stopping")
    ap.add_argument("--storage", default="runs/bench_asha")
    ap.add_argument("--out", default="bench/results/asha.json")
    args = ap.parse_args()
    spec = read_yaml(args.sweep)["sweep"]
    max_t, slots = spec["tokens_per_trial"], spec["max_concurrent_trials"]

    base = run(args, "asha-no", "asha.enabled=false")
    limit = base["best_val_ppl"] * (1 + args.tolerance)
    replays = []
    for g in GRACE_EVALS:
        for f in FACTORS:
            grace = g * args.eval_every_tokens
            exact = replay(base["rows"], grace, f, max_t, slots)
            jittered = [replay(base["rows"], grace, f, max_t, slots, seed) for seed in range(ORDERINGS)]
            replays.append({
                **exact,
                "kept_share": sum(r["best_val_ppl"] <= limit for r in jittered) / ORDERINGS,
                "mean_tokens": sum(r["tokens"] for r in jittered) / ORDERINGS,
            })  # fmt: skip
    keeps = [r for r in replays if r["best_val_ppl"] <= limit and r["kept_share"] >= KEEP_SHARE]
    chosen = min(keeps, key=lambda r: (r["mean_tokens"], -r["grace_period_tokens"]))
    runs = {"no early stopping": base}
    # The chosen setting live, and any other setting a previous pass of this bench ran live (kept, so
    # a setting that lost the winner stays on the record).
    chosen_name = f"asha-g{chosen['grace_period_tokens']}-rf{chosen['reduction_factor']}"
    for name in sorted({chosen_name} | {p.name for p in Path(args.storage).glob("asha-g*-rf*")}):
        grace, factor = name.removeprefix("asha-g").split("-rf")
        label = f"ASHA, grace {int(grace):,} tokens, factor {factor} (live sweep)"
        runs[label] = run(
            args, name, f"asha.enabled=true asha.grace_period_tokens={grace} asha.reduction_factor={factor}"
        )
        if name == chosen_name:
            live = runs[label]
    table = [
        "| sweep | trials (stopped early) | best val ppl | ppl / no stopping | tokens trained | "
        "tokens / no stopping | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {name} | {r['trials']} ({r['stopped']}) | {r['best_val_ppl']:.2f} | "
        f"{r['best_val_ppl'] / base['best_val_ppl']:.3f} | {r['tokens']:,} | "
        f"{r['tokens'] / base['tokens']:.2f} | {r['wall_s'] / 60:.1f} min |"
        for name, r in runs.items()
    ]
    replay_table = [
        "| grace (tokens) | factor | stopped early | best val ppl | ppl / no stopping | tokens / no stopping "
        f"| winner kept, {ORDERINGS} jittered orderings | mean tokens / no stopping, jittered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    replay_table += [
        f"| {r['grace_period_tokens']:,} | {r['reduction_factor']} | {r['stopped']} of {r['trials']} | "
        f"{r['best_val_ppl']:.2f} | {r['best_val_ppl'] / base['best_val_ppl']:.3f} | "
        f"{r['tokens'] / base['tokens']:.2f} | {r['kept_share']:.0%} | "
        f"{r['mean_tokens'] / base['tokens']:.2f} |" + (" **chosen**" if r is chosen else "")
        for r in replays
    ]
    print("\n".join(table))
    print("\nreplays of the no-stopping trials under Ray's ASHAScheduler:")
    print("\n".join(replay_table))
    for r in runs.values():
        del r["rows"]
    write_result(
        args.out,
        {
            "sweep": args.sweep,
            "num_samples": args.num_samples,
            "eval_every_tokens": args.eval_every_tokens,
            "tolerance": args.tolerance,
            "runs": runs,
            "replays": replays,
            "chosen": chosen,
            "same_winner": live["best_params"] == base["best_params"],
            "table": table,
            "replay_table": replay_table,
        },
    )


if __name__ == "__main__":
    main()
