"""Early stopping against none at a search's size: which ASHA setting keeps the winner at the fewest tokens.

1. The demo sweep with `--num-samples` trials (16 by default) and no early stopping, an evaluation
   every `--eval-every-tokens`: every trial's whole validation curve and its timing.
2. Replays of those trials under Ray Tune's own ASHAScheduler for each grace period x reduction
   factor: the trials start in the sweep's order, `max_concurrent_trials` at a time, each report
   arriving after the time it took in step 1, so the scheduler sees results in the order a live
   sweep would; a stopped trial frees its slot for the next one.
3. The setting that keeps the no-stopping best within `--tolerance` at the fewest tokens, run for
   real (a second sweep, same seed) to check the replay.

Writes bench/results/asha.json: `runs` by name (each with `tokens`, `best_val_ppl`, `trials`), the
replay table and the chosen setting. Resumable: rerunning reuses the finished sweeps under --storage.

    .venv/bin/python bench/bench_asha.py [--num-samples 16] [--storage runs/bench_asha]
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path
from types import SimpleNamespace

from recipe import write_result

from loqt_ray.config import read_yaml
from loqt_ray.results import leaderboard
from loqt_ray.sweep import run_sweep

GRACE_EVALS = (1, 2, 3, 4)  # grace periods in evaluations
FACTORS = (2, 3, 4)


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


def replay(rows: list[dict], grace: int, factor: int, max_t: int, slots: int) -> dict:
    """The no-stopping trials under Ray's ASHAScheduler, in the order a live sweep would report them."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(
        time_attr="tokens", metric="val_ppl", mode="min", max_t=max_t, grace_period=grace,
        reduction_factor=factor,
    )  # fmt: skip
    order = sorted(rows, key=lambda r: int(Path(r["dir"]).name.split("_")[3]))  # Tune's trial index
    waiting = list(reversed(order))
    events: list[tuple[float, int, int]] = []  # (time, trial index, report index)
    reports = {i: _reports(r) for i, r in enumerate(order)}
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
    replays = [
        replay(base["rows"], g * args.eval_every_tokens, f, max_t, slots)
        for g in GRACE_EVALS
        for f in FACTORS
    ]
    keeps = [r for r in replays if r["best_val_ppl"] <= base["best_val_ppl"] * (1 + args.tolerance)]
    chosen = min(keeps, key=lambda r: (r["tokens"], -r["grace_period_tokens"]))
    setting = f"asha.grace_period_tokens={chosen['grace_period_tokens']} " + (
        f"asha.reduction_factor={chosen['reduction_factor']}"
    )
    live = run(args, f"asha-g{chosen['grace_period_tokens']}-rf{chosen['reduction_factor']}",
               f"asha.enabled=true {setting}")  # fmt: skip

    label = f"ASHA, grace {chosen['grace_period_tokens']:,} tokens, factor {chosen['reduction_factor']}"
    runs = {"no early stopping": base, f"{label} (live sweep)": live}
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
        "| grace (tokens) | factor | stopped early | best val ppl | ppl / no stopping | "
        "tokens / no stopping |",
        "|---|---|---|---|---|---|",
    ]
    replay_table += [
        f"| {r['grace_period_tokens']:,} | {r['reduction_factor']} | {r['stopped']} of {r['trials']} | "
        f"{r['best_val_ppl']:.2f} | {r['best_val_ppl'] / base['best_val_ppl']:.3f} | "
        f"{r['tokens'] / base['tokens']:.2f} |" + (" **chosen**" if r is chosen else "")
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
