"""The engine: who owns the trainable values and the optimizer, and who steps it.

The trainer drives every engine through the same calls, once per optimizer step:

    engine.set_lr(lr)
    on update steps: the merge (full_precision, set_param), on refresh steps after a capture pass
    for each micro-batch:  loss = engine.model(...).loss / grad_accum;  engine.backward(loss)
    norm = engine.step()          # the one call that applies the optimizer step

- `model`: the module forwards go through (training and evaluation alike; with
  train.cuda_graphs, training steps replay a recording of the inner model's loss instead,
  graphs.py, and `backward` takes that loss as it takes any other). A refresh's capture pass
  calls the inner model's forward past its hooks and takes the gradient with
  torch.autograd.grad: nothing reaches .grad, so no engine sees the pass or counts it.
- `backward(loss)`: accumulates one micro-batch's gradients; never steps the optimizer
  (per-layer updates are the one exception, documented on PerLayerOptimizer: they step
  inside the backward of the step's last micro-batch, and `step` then only reports).
- `step()`: clips, applies the accumulated step, zeroes the gradients; returns the global
  gradient norm before clipping as a 0-dim tensor (no host sync), or None where no global
  norm exists (per-layer updates).
- `full_precision(p)`: the value the optimizer steps (its master copy), as a float32 tensor.
- `set_param(p, value)`: installs a new value everywhere the engine keeps one (master copy
  and forward copy), as a merge does for B.
- `state_dict()` / `load_state_dict(state)`: {"params": {name: fp32 value}, "optimizer": {name:
  that parameter's optimizer state}}, keyed by parameter name and encoded alike by every engine
  and ZeRO stage, as plain tensors and numbers (checkpoint.py stores them; weights_only loads
  them; a checkpoint of one engine loads into another).
- `state_bytes()`: bytes of weights, gradients and optimizer state as this engine holds them.

PlainEngine is the single-process torch implementation; distributed.DeepSpeedEngine is
the DeepSpeed ZeRO one; `engine_for(cfg)` is the one `loqt-ray train` runs for a config.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from .config import Config
from .optim import PerLayerOptimizer, apply_lr, make_optimizer


class Engine(Protocol):
    model: torch.nn.Module
    params: list[torch.nn.Parameter]

    def set_lr(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor | None: ...

    def full_precision(self, param: torch.nn.Parameter) -> torch.Tensor: ...

    def set_param(self, param: torch.nn.Parameter, value: torch.Tensor) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def state_bytes(self) -> dict: ...


def engine_for(cfg: Config):
    """The engine class `loqt-ray train` runs for `cfg`: DeepSpeed, except under per-layer updates
    (single-worker, stepped inside backward), which the plain engine runs."""
    if cfg.optim.per_layer:
        return PlainEngine
    from .distributed import DeepSpeedEngine

    return DeepSpeedEngine


def trainable(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The names and parameters an engine trains, in the model's order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [name for name, _ in named], [p for _, p in named]


def _on_cpu(value):
    if torch.is_tensor(value):
        return value.detach().cpu()
    return {k: _on_cpu(v) for k, v in value.items()} if isinstance(value, dict) else value


def _names_in_order(optimizer: torch.optim.Optimizer, name_of: dict[int, str]) -> list[str]:
    """The names of the optimizer's parameters in its state dict's order (group by group)."""
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def named_optimizer_state(optimizer: torch.optim.Optimizer, name_of: dict[int, str]) -> dict[str, dict]:
    """A torch optimizer's per-parameter state by name (`name_of`: id(parameter) -> name)."""
    by_index = optimizer.state_dict()["state"]
    names = _names_in_order(optimizer, name_of)
    return {name: _on_cpu(by_index[i]) for i, name in enumerate(names) if i in by_index}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, name_of: dict[int, str], state: dict
) -> None:
    """named_optimizer_state's inverse, through the optimizer's own load_state_dict (which casts and
    moves each state like its parameter)."""
    groups = optimizer.state_dict()["param_groups"]
    names = _names_in_order(optimizer, name_of)
    by_index = {i: state[name] for i, name in enumerate(names) if name in state}
    optimizer.load_state_dict({"state": by_index, "param_groups": groups})


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held_bytes(
    module: torch.nn.Module,
    params: list,
    optimizer_tensors: Iterable[torch.Tensor],
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> dict:
    """Weights (parameters and buffers), master copies (tensors the optimizers step that are not
    the module's parameters: DeepSpeed's fp32 partitions), gradients (one per trainable element,
    as held during a step) and optimizer state (every tensor it keeps): what every engine reports."""
    own = {id(p) for p in module.parameters()}
    stepped = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    return {
        "weight_bytes": tensor_bytes(list(module.parameters()) + list(module.buffers())),
        "master_bytes": tensor_bytes(p for p in stepped if id(p) not in own),
        "grad_bytes": tensor_bytes(params),
        "optimizer_bytes": tensor_bytes(optimizer_tensors),
    }


def optimizer_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [
        v for opt in optimizers for state in opt.state.values() for v in state.values() if torch.is_tensor(v)
    ]


class PlainEngine:
    """A torch optimizer (or per-layer optimizers) on one process."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.model, self.cfg = model, cfg
        self.names, self.params = trainable(model)
        self.name_of = {id(p): name for name, p in zip(self.names, self.params, strict=True)}
        if cfg.optim.per_layer:
            self.optimizer = PerLayerOptimizer(self.params, cfg.optim, cfg.peak_lr(), self.names)
        else:
            self.optimizer = make_optimizer(self.params, cfg.optim, cfg.peak_lr(), self.names)
        self.micro_batches = 0  # backward calls since the last step

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        if isinstance(self.optimizer, PerLayerOptimizer):
            return list(self.optimizer.optimizers.values())
        return [self.optimizer]

    def set_lr(self, lr: float) -> None:
        if isinstance(self.optimizer, PerLayerOptimizer):
            self.optimizer.set_lr(lr)
            return
        apply_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        if isinstance(self.optimizer, PerLayerOptimizer):  # the step's last micro-batch steps
            self.optimizer.stepping = self.micro_batches + 1 == self.cfg.train.grad_accum
        loss.backward()
        self.micro_batches += 1

    def step(self) -> torch.Tensor | None:
        self.micro_batches = 0
        if isinstance(self.optimizer, PerLayerOptimizer):
            return None  # each tensor stepped inside the last micro-batch's backward
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def full_precision(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.detach().float()

    def set_param(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)

    def state_dict(self) -> dict:
        if isinstance(self.optimizer, PerLayerOptimizer):
            optimizer = {}
            for p in self.params:
                optimizer.update(named_optimizer_state(self.optimizer.optimizers[p], self.name_of))
        else:
            optimizer = named_optimizer_state(self.optimizer, self.name_of)
        params = {
            name: p.detach().float().cpu().clone() for name, p in zip(self.names, self.params, strict=True)
        }
        return {"params": params, "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        for name, p in zip(self.names, self.params, strict=True):
            self.set_param(p, state["params"][name])
        if isinstance(self.optimizer, PerLayerOptimizer):
            for p in self.params:
                load_named_optimizer_state(self.optimizer.optimizers[p], self.name_of, state["optimizer"])
        else:
            load_named_optimizer_state(self.optimizer, self.name_of, state["optimizer"])

    def state_bytes(self) -> dict:
        return held_bytes(self.model, self.params, optimizer_tensors(self._optimizers), self._optimizers)
