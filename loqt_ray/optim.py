"""Optimizers and the learning-rate schedule.

AdamW (torch), 8-bit Adam (bitsandbytes), and per-layer updates: one optimizer
per trainable tensor, stepped from a post-accumulate-grad hook that frees the
gradient at once, so no step needs every gradient at once and, with one
micro-batch per step, at most one tensor's gradient exists at a time (the
paper's way to train 13B on one GPU).
"""

from __future__ import annotations

import math

import torch

from .config import LINEAR_NAMES, Config, OptimConfig


def lr_ratio(name: str, cfg: OptimConfig) -> float:
    """optim.matrix_lr_ratio for a value of an attention or MLP matrix (its weight, or LoQT's B),
    1 for the rest."""
    parts = name.split(".")
    return cfg.matrix_lr_ratio if len(parts) >= 2 and parts[-2] in LINEAR_NAMES else 1.0


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float, names: list[str] | None = None
) -> torch.optim.Optimizer:
    """The optimizer of `params`; named, they go in one group per learning-rate ratio, each group
    keeping its ratio (apply_lr)."""
    groups: dict[float, list] = {}
    for i, p in enumerate(params):
        groups.setdefault(lr_ratio(names[i], cfg) if names else 1.0, []).append(p)
    param_groups = [{"params": ps, "lr": lr * ratio, "lr_ratio": ratio} for ratio, ps in groups.items()]
    if cfg.name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(
            param_groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(param_groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate in every group, times the group's ratio."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to optim.min_lr_ratio at train.steps."""
    warmup, total, floor = cfg.warmup_steps(), cfg.train.steps, cfg.optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class PerLayerOptimizer:
    """One optimizer per trainable tensor, each stepped as soon as its step's gradient is complete.

    Under gradient accumulation a tensor's gradient accumulates in .grad over the step's
    micro-batches as usual, and only the last micro-batch's backward (`stepping`, which the
    engine sets) clips, steps and frees it as it lands: one optimizer step per step, at the
    step's learning rate, on the whole step's gradient. (Stepping every micro-batch, as the
    references' per-layer modes do, would take grad_accum optimizer steps on partial gradients.)
    Clipping by the global norm is impossible here (no moment holds all gradients), so each
    tensor's accumulated gradient is clipped to optim.grad_clip by its own norm.
    """

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float, names: list[str]):
        self.cfg = cfg
        self.optimizers = {
            p: make_optimizer([p], cfg, lr, [name]) for p, name in zip(params, names, strict=True)
        }
        self.lr = lr
        self.stepping = True  # whether the backward under way completes the step's gradients
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, p: torch.nn.Parameter) -> None:
        if not self.stepping:  # a micro-batch before the step's last: its gradient accumulates
            return
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p], self.cfg.grad_clip)
        opt = self.optimizers[p]
        apply_lr(opt, self.lr)
        opt.step()
        p.grad = None

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
