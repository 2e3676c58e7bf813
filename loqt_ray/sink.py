"""Where a training loop's results go: the trainer's side of the contract, and the sink of
in-process runs. Apart from trainer.py, so that what runs beside the workers (a sweep's trial,
Ray Train's controller, both of which load ray_train.py's sink) does not load the model, data and
quantization stack the trainer needs.
"""

from __future__ import annotations

from collections.abc import Callable


class Sink:
    """Where a training loop's results go; the trainer calls these on every rank.

    - `step_done(step, seconds)` after every optimizer step, with its host time;
    - `log(metrics)` for each logged step (every log_every and eval_every step) that is not a
      checkpoint step;
    - `checkpoint(metrics, state)` for each checkpoint step (every train.checkpoint_every steps
      and the last one): its metrics, and `state()`, which builds its checkpoint state. Building
      it is a collective under ZeRO, so a sink that keeps states calls it on every rank.

    This base class keeps nothing: a checkpoint step is logged like any other."""

    def step_done(self, step: int, seconds: float) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def checkpoint(self, metrics: dict, state: Callable[[], dict]) -> None:
        self.log(metrics)


class Collect(Sink):
    """In-process runs (tests, benchmarks): every logged step's metrics appended to `rows`, and
    each checkpoint step's state, when `on_state` is given, handed to it."""

    def __init__(self, rows: list | None = None, on_state: Callable[[dict], object] | None = None):
        self.rows = [] if rows is None else rows
        self.on_state = on_state

    def log(self, metrics: dict) -> None:
        self.rows.append(metrics)

    def checkpoint(self, metrics: dict, state: Callable[[], dict]) -> None:
        if self.on_state is not None:
            self.on_state(state())
        self.log(metrics)
