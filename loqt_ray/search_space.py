"""Search spaces: YAML distributions over config fields, checked before any trial runs.

    params:
      loqt.rank: {choice: [16, 32, 64]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      loqt.update_interval: {int: [20, 100]}
      loqt.lora_alpha: {uniform: [0.25, 1.0]}
      train.seed: {grid: [0, 1]}

Keys are dotted config fields (the same as `--set`). `grid` tries every value
(Tune's grid_search): a space with grid entries runs every combination of them
num_samples times, the other entries sampled at random for each; a space
without one is searched by Optuna's TPE. Every combination of the grid and
choice values and range ends (the corners of the space) is validated as a full
training config, so a trial can never be handed an impossible setting: a rank
that does not fit a wrapped layer, a refresh interval that is not a multiple of
the merge interval, a block size bitsandbytes does not accept.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, make_config, read_yaml

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "int")
LISTED = ("choice", "grid")  # distributions over the values listed, not a [low, high] range
MAX_CORNERS = 4096


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    values: tuple

    def corners(self) -> tuple:
        return self.values if self.kind in LISTED else (self.values[0], self.values[1])

    def optuna(self):
        """The distribution for Optuna, which the sweep report rebuilds its study with (tune_run.py
        makes Ray Tune's domain of it)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind in LISTED:
            return CategoricalDistribution(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return IntDistribution(low, high)
        return FloatDistribution(low, high, log=self.kind == "loguniform")

    def to_yaml(self) -> dict:
        return {self.key: {self.kind: list(self.values)}}


def parse_space(path: str | Path) -> list[Param]:
    data = read_yaml(path)
    where = str(path)
    if set(data) != {"params"} or not isinstance(data["params"], dict) or not data["params"]:
        raise ConfigError(
            where, "a search space is a mapping with one key, params, of field: {distribution: values}"
        )
    params = []
    for key, spec in data["params"].items():
        name = f"{where}: params.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                name, f"must be one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}} (got {spec!r})"
            )
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(name, f"{kind} needs a non-empty list (got {values!r})")
        if kind == "grid" and len({repr(v) for v in values}) != len(values):
            raise ConfigError(name, f"grid lists a value twice (got {values!r})")
        if kind not in LISTED:
            if (
                len(values) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                or values[0] >= values[1]
            ):
                raise ConfigError(name, f"{kind} needs [low, high] numbers with low < high (got {values!r})")
            if kind == "int" and not all(isinstance(v, int) for v in values):
                raise ConfigError(name, f"int needs integer bounds (got {values!r})")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(name, f"loguniform needs low > 0 (got {values!r})")
        params.append(Param(str(key), kind, tuple(values)))
    return params


def grid_size(params: list[Param]) -> int:
    """How many grid points the space has (1 without grid entries): trials = num_samples x this."""
    return math.prod(len(p.values) for p in params if p.kind == "grid")


def apply_params(base: dict, values: dict[str, Any]) -> Config:
    """The training config of one trial: `base` (a config dict) with `values` set."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return make_config(data)


def check_space(params: list[Param], base: dict, space_path: str | Path) -> None:
    """Validate every corner of the space as a full config; raise naming the first bad one."""
    corners = list(itertools.islice(itertools.product(*(p.corners() for p in params)), MAX_CORNERS))
    for combo in corners:
        values = dict(zip((p.key for p in params), combo, strict=True))
        try:
            apply_params(base, values)
        except ConfigError as exc:
            raise ConfigError(
                f"{space_path}: params.{exc.field}", f"{str(exc).split(': ', 1)[1]} at {values}"
            ) from None
