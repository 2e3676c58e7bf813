"""When to merge B into W, and when to also refresh the projection P.

Update (merge) steps start at 0, then tau. After that the k-th gap (k = 1, 2, ...)
is tau (static), tau + k * increment (linear) or tau + floor(psi ** k)
(exponential), optionally capped at max_gap. A refresh happens on every
(refresh_interval / update_interval)-th update step, step 0 included. The trainer merges
before the update step's optimizer step (Trainer._merge says why).
"""

from __future__ import annotations

import math

from .config import LoQTConfig


def update_steps(
    total_steps: int,
    schedule: str = "exponential",
    tau: int = 100,
    psi: float = 1.2,
    increment: int = 100,
    max_gap: int | None = None,
) -> list[int]:
    """The update steps below total_steps, e.g. tau=100, psi=1.2: 0, 100, 201, 302, 403, 505, ..."""
    gaps = {
        "static": lambda k: tau,
        "linear": lambda k: tau + k * increment,
        "exponential": lambda k: tau + math.floor(psi**k),
    }[schedule]
    steps, step, k = [0], tau, 1
    while step < total_steps:
        steps.append(step)
        step += gaps(k) if max_gap is None else min(gaps(k), max_gap)
        k += 1
    return steps


class UpdateSchedule:
    """The LoQT config's schedule over a run of total_steps optimizer steps."""

    def __init__(self, cfg: LoQTConfig, total_steps: int):
        self.steps = update_steps(
            total_steps, cfg.schedule, cfg.update_interval, cfg.psi, cfg.gap_increment, cfg.max_gap
        )
        every = (cfg.refresh_interval or cfg.update_interval) // cfg.update_interval
        self.refresh_steps = set(self.steps[::every])
        self.update_set = set(self.steps)

    def is_update(self, step: int) -> bool:
        return step in self.update_set

    def is_refresh(self, step: int) -> bool:
        return step in self.refresh_steps
