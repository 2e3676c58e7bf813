"""Optimizers and the learning-rate schedule.

AdamW (torch), 8-bit Adam (bitsandbytes), and per-layer updates: one optimizer
per trainable tensor, stepped from a post-accumulate-grad hook that frees the
gradient at once, so at most one tensor's gradient exists at a time (the
paper's way to train 13B on one GPU).
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PerLayerOptimizer:
    """One optimizer per trainable tensor, each stepped as soon as its gradient is ready.

    Clipping by the global norm is impossible here (no moment holds all
    gradients), so a per-tensor norm clip is applied instead.
    """

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimConfig):
        self.cfg = cfg
        self.optimizers = {p: make_optimizer([p], cfg) for p in params}
        self.lr = cfg.lr
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, p: torch.nn.Parameter) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p], self.cfg.grad_clip)
        opt = self.optimizers[p]
        for group in opt.param_groups:
            group["lr"] = self.lr
        opt.step()
        p.grad = None

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers.values()]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers.values(), states, strict=True):
            opt.load_state_dict(state)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
