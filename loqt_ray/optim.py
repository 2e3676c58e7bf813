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

from .config import Config, OptimConfig


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


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

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float):
        self.cfg = cfg
        self.optimizers = {p: make_optimizer([p], cfg, lr) for p in params}
        self.lr = lr
        self.stepping = True  # whether the backward under way completes the step's gradients
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, p: torch.nn.Parameter) -> None:
        if not self.stepping:  # a micro-batch before the step's last: its gradient accumulates
            return
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p], self.cfg.grad_clip)
        opt = self.optimizers[p]
        for group in opt.param_groups:
            group["lr"] = self.lr
        opt.step()
        p.grad = None

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
