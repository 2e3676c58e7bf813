"""What a user watches while a run or a sweep works: a bar on a terminal, status lines in a job's log.

RunProgress follows one training run by tailing its metrics.jsonl (written by rank 0).
SweepProgress shows a sweep's state: trials done / running / stopped early / failed of
N, tokens trained against the no-stopping budget, the best validation perplexity so
far, elapsed time and an estimate of the rest, with one line per trial that ends. It
is fed by the sweep's Tune callback (sweep.py) and knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from . import rundir

LOG_EVERY_S = 15.0  # status lines in a non-terminal log (`ray job logs`)
REFRESH_EVERY_S = 2.0  # the bar on a terminal


@contextlib.contextmanager
def console_to_log(log: Path):
    """While a run or sweep works, everything printed to stdout/stderr (Ray's banners, the raylet's
    worker warnings, Tune's and Optuna's notes; at the file-descriptor level and Python's) goes to
    `log`; yields a stream on the real console for our own display."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:  # and Python's own streams, where something (a test's capture) replaced them
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved, strict=True):
                os.dup2(original, fd)
                os.close(original)
            console.close()


class Periodic:
    """A context manager that calls `tick()` from a daemon thread every `every_s` seconds while its
    block runs, and once more as the block ends when `tick_at_exit` (to show what was written last)."""

    every_s: float
    tick_at_exit = False

    def __enter__(self):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self.every_s):
            self.tick()
        if self.tick_at_exit:
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class RunProgress(Periodic):
    """A tqdm bar over the run's steps, from `start` (the step a rerun resumes from), moved by a
    thread that tails metrics.jsonl (new bytes only). After a failure Ray restarts the worker group
    from the last checkpoint: said in one line, seen as a new group in workers.jsonl."""

    every_s = 0.5
    tick_at_exit = True  # the last steps' metrics land just before the run returns

    def __init__(
        self, out: Path, total: int, name: str, enabled: bool, stream: TextIO | None = None, start: int = 0
    ):
        from tqdm import tqdm

        self.path = out / rundir.METRICS_FILE
        self.stream = stream or sys.stderr
        previous = rundir.read_metrics(out)
        self.bar = tqdm(
            total=total,
            # not the log's last step: a rerun's rank 0 cuts the log back to the checkpoint, and a
            # bar that started past it would go back and show a negative rate
            initial=start,
            desc=name,
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            file=stream,
        )
        self.repairs = previous[-1].get("rank_repairs", 0) if previous else 0
        self.out = out
        self.starts = self._group_starts()  # worker groups started before this command
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.reread = False  # rank 0 rewrote the log (cut at a resume or restart): read it anew

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.bar.close()

    def _show(self, metrics: dict, jump: bool = False) -> None:
        if jump:  # the log was cut back to a checkpoint's step: the bar goes there, not through 1, 2, ...
            self.bar.n = self.bar.last_print_n = metrics["step"]
        else:
            self.bar.update(metrics["step"] - self.bar.n)
        repairs = metrics.get("rank_repairs", 0)
        if repairs > self.repairs:  # rare, and worth a line: the ranks' merged layers had drifted
            self.bar.write(
                f"step {metrics['step']}: {repairs - self.repairs} layer(s) differed between ranks after a "
                "merge and were repaired from rank 0 (the workers' logs name them)",
                file=self.stream,
            )
            self.repairs = repairs
        shown = {"loss": f"{metrics['train_loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
        if "val_ppl" in metrics:
            shown["ppl"] = f"{metrics['val_ppl']:.1f}"
        self.bar.set_postfix(shown)

    def _group_starts(self) -> int:
        return len({row["time"] for row in rundir.read_workers(self.out)})

    def _say_restarts(self) -> None:
        """A worker group started after this command's first one: Ray restarted it after a failure."""
        starts = self._group_starts()
        if starts > self.starts + 1:
            from .checkpoint import latest, step_of

            saved = latest(self.out)
            where = f"the checkpoint at step {step_of(saved)}" if saved else "the start (no checkpoint yet)"
            self.bar.write(f"workers restarted after a failure; going on from {where}", file=self.stream)
            self.starts = starts - 1

    def tick(self) -> None:
        self._say_restarts()
        if not self.path.exists():
            return
        if self.path.stat().st_size < self.offset:  # rank 0 cut the steps it will redo
            self.offset, self.reread = 0, True
        with open(self.path) as f:
            f.seek(self.offset)
            lines = f.readlines()
        complete = [line for line in lines if line.endswith("\n")]  # a half-written line waits
        try:
            rows = [json.loads(line) for line in complete]
        except json.JSONDecodeError:  # rewritten under us (a restart cut it): read it anew next time
            self.offset, self.reread = 0, True
            return
        self.offset += sum(len(line.encode()) for line in complete)
        if self.reread and rows:  # the kept steps were shown before: only where the log now ends
            self._show(rows[-1], jump=True)
            rows, self.reread = [], False
        for metrics in rows:
            self._show(metrics)


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class SweepProgress:
    """A sweep's state, shown as a bar on a terminal or as a status line every LOG_EVERY_S elsewhere.

    `update` takes every trial's (status, tokens, val_ppl) as Tune holds them; statuses are
    "pending", "running", "completed", "stopped early" and "failed"."""

    def __init__(self, name: str, num_trials: int, tokens_per_trial: int, stream: TextIO):
        self.name, self.num_trials, self.per_trial = name, num_trials, tokens_per_trial
        self.stream, self.tty = stream, stream.isatty()
        self.start = time.monotonic()
        self.trials: dict[str, tuple[str, int, float]] = {}
        self.tokens_at_start: int | None = None  # what a resumed sweep had trained before this start
        self.last_shown = 0.0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=num_trials * tokens_per_trial,
                desc=name,
                unit="tok",
                unit_scale=True,
                file=stream,
                dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar:12}| {postfix}",
            )

    def counts(self) -> dict[str, int]:
        statuses = [status for status, _, _ in self.trials.values()]
        counts = {s: statuses.count(s) for s in ("completed", "running", "stopped early", "failed")}
        counts["pending"] = self.num_trials - sum(counts.values())
        return counts

    def trained(self) -> int:
        return sum(tokens for _, tokens, _ in self.trials.values())

    def best(self) -> tuple[str, float] | None:
        scored = [(ppl, trial) for trial, (_, _, ppl) in self.trials.items() if ppl < float("inf")]
        return (min(scored)[1], min(scored)[0]) if scored else None

    def remaining_s(self) -> float | None:
        """Seconds left at this start's token rate, every unfinished trial run to the full budget."""
        ended = ("completed", "stopped early", "failed")
        to_train = sum(
            0 if status in ended else self.per_trial - tokens for status, tokens, _ in self.trials.values()
        )
        to_train += self.counts()["pending"] * self.per_trial
        done_here = self.trained() - (self.tokens_at_start or 0)
        if to_train == 0:
            return 0.0
        return to_train * (time.monotonic() - self.start) / done_here if done_here > 0 else None

    def line(self) -> str:
        c, best, left = self.counts(), self.best(), self.remaining_s()
        return " | ".join(
            [
                f"{c['completed']} done, {c['running']} running, {c['stopped early']} stopped early, "
                f"{c['failed']} failed of {self.num_trials} trials",
                f"{_tokens(self.trained())} of {_tokens(self.num_trials * self.per_trial)} tokens",
                f"best val ppl {best[1]:.2f} ({best[0]})" if best else "no evaluation yet",
                f"{_clock(time.monotonic() - self.start)} elapsed, "
                + (f"at most ~{_clock(left)} left" if left is not None else "time left unknown yet"),
            ]
        )

    def update(self, trials: dict[str, tuple[str, int, float]], force: bool = False) -> None:
        self.trials = dict(trials)
        if self.tokens_at_start is None:
            self.tokens_at_start = self.trained()
        now = time.monotonic()
        if not force and now - self.last_shown < (REFRESH_EVERY_S if self.bar is not None else LOG_EVERY_S):
            return
        self.last_shown = now
        if self.bar is not None:
            self.bar.n = self.trained()
            self.bar.set_postfix_str(self.line())
        else:
            self.write(f"{self.name}: {self.line()}")

    def event(self, text: str) -> None:
        """A trial ended: one line above the bar, or in the log."""
        self.write(f"{self.name}: {text}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trials:  # a finished sweep rerun shows no trials here: its leaderboard follows
            self.write(f"{self.name}: {self.line()}")
