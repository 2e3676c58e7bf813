"""Training-memory estimate per component for full-rank, LoRA, GaLore, LoQT and LoQT-nq.

The accounting follows the paper's Table 3, for each wrapped m x n matrix (m <= n):

    method    weights                       gradients   optimizer states
    full      mn                            mn          2mn
    LoRA      mn + mr + nr                  mr + nr     2mr + 2nr
    GaLore    mn                            mn          mr + 2nr   (P and the projected moments)
    LoQT      NF4(mn) + mr + nr             nr          2nr        (P on the small side, B on the large)
    LoQT-nq   mn + mr + nr                  nr          2nr

Every other parameter (embeddings, lm_head, norms) is trained full-rank with
Adam by every method, as in our trainer and the paper. NF4 bytes are exact
for bitsandbytes' layout (packed nibbles, per-block absmax, nested
statistics with double quantization). Stated assumptions, one set for all
sizes: weights, gradients and Adam moments at `param_bytes` / `grad_bytes` /
`state_bytes` (bf16 = 2 by default; the paper's memory column is weights +
optimizer states in bf16, in GiB); 8-bit Adam keeps 1-byte moments plus an
fp32 absmax per 256 values for tensors of 4096+ values (bitsandbytes'
blockwise layout; smaller ones stay 32-bit); activations in bf16, attention by
a fused kernel (no seq^2 scores kept), no activation checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import LINEAR_NAMES, MODEL_SIZES, Config, ModelShape

METHODS = ("full", "lora", "galore", "loqt", "loqt-nq")
GIB = 2**30
BNB_8BIT_MIN_SIZE, BNB_8BIT_BLOCK = 4096, 256


@dataclass(frozen=True)
class Assumptions:
    param_bytes: float = 2.0  # full-precision weights, P, B, LoRA factors
    grad_bytes: float = 2.0
    state_bytes: float = 2.0  # each Adam moment (adamw); 8-bit Adam ignores it
    activation_bytes: float = 2.0
    optimizer: str = "adamw"
    step_counter_bytes: float = 0.0  # torch AdamW keeps an fp32 step per tensor (4); the paper ignores it
    block_size: int = 64
    double_quant: bool = True
    quantize_projection: bool = False
    per_layer: bool = False  # gradients freed tensor by tensor inside backward


def assumptions_for(cfg: Config, width: float) -> Assumptions:
    """The config's optimizer and quantization settings, with every dense value `width` bytes wide."""
    return Assumptions(
        param_bytes=width,
        grad_bytes=width,
        state_bytes=width,
        activation_bytes=width,
        optimizer=cfg.optim.name,
        block_size=cfg.loqt.quant_block_size,
        double_quant=cfg.loqt.double_quant,
        quantize_projection=cfg.loqt.quantize_projection,
        per_layer=cfg.optim.per_layer,
    )


@dataclass(frozen=True)
class Estimate:
    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    refresh_capture: float  # transient on LoQT refresh steps: the fp32 gradient of every wrapped W

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.activations


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 tensor as bitsandbytes stores it (see quant.NF4Tensor's buffers)."""
    blocks = math.ceil(numel / block_size)
    code = 16 * 4
    if not double_quant:
        return math.ceil(numel / 2) + 4 * blocks + code
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + code


def adam_bytes(sizes: list[int], a: Assumptions) -> float:
    """Two moments (+ step counters) for trainable tensors of these sizes."""
    total = a.step_counter_bytes * len(sizes)
    for n in sizes:
        if a.optimizer == "adam8bit" and n >= BNB_8BIT_MIN_SIZE:
            total += 2 * (n + 4 * math.ceil(n / BNB_8BIT_BLOCK))
        else:
            total += 2 * n * (a.state_bytes if a.optimizer == "adamw" else 4)
    return total


def activation_bytes(
    shape: ModelShape, vocab: int, batch: int, seq: int, rank: int, method: str, a: Assumptions
) -> float:
    """Saved for backward: per layer 14·s·b·h (norm inputs/outputs, q, k, v, attention output)
    + 8·s·b·i (gate, up, SiLU, product), plus s·b·r per wrapped matrix for low-rank methods;
    logits in bf16 and fp32 for the loss."""
    tokens = batch * seq
    per_layer = tokens * (14 * shape.hidden + 8 * shape.intermediate)
    if method in ("lora", "loqt", "loqt-nq"):
        per_layer += tokens * len(LINEAR_NAMES) * rank
    return a.activation_bytes * (shape.layers * per_layer + tokens * shape.hidden) + tokens * vocab * (
        a.activation_bytes + 4
    )


def estimate(
    size: str,
    method: str,
    rank: int,
    vocab: int = 32000,
    batch: int = 1,
    seq: int = 256,
    a: Assumptions = Assumptions(),
) -> Estimate:
    shape = MODEL_SIZES[size]
    mats = [(min(o, i), max(o, i)) for o, i in shape.linear_shapes()]  # (m, n) with m <= n
    ranks = [min(rank, m) for m, _ in mats]
    others = shape.other_tensors(vocab)
    pb, gb = a.param_bytes, a.grad_bytes
    mn = sum(m * n for m, n in mats)
    small = sum(m * r for (m, _), r in zip(mats, ranks, strict=True))  # P (LoQT, GaLore) or A (LoRA)
    large = sum(n * r for (_, n), r in zip(mats, ranks, strict=True))  # B
    if method == "full":
        weights, trainable = mn * pb, [m * n for m, n in mats]
        states = adam_bytes(trainable + others, a)
    elif method == "lora":
        weights = (mn + small + large) * pb
        trainable = [m * r for (m, _), r in zip(mats, ranks, strict=True)] + [
            n * r for (_, n), r in zip(mats, ranks, strict=True)
        ]
        states = adam_bytes(trainable + others, a)
    elif method == "galore":
        weights, trainable = mn * pb, [m * n for m, n in mats]
        states = small * pb + adam_bytes([n * r for (_, n), r in zip(mats, ranks, strict=True)] + others, a)
    elif method in ("loqt", "loqt-nq"):
        if method == "loqt":
            w = sum(nf4_bytes(m * n, a.block_size, a.double_quant) for m, n in mats)
        else:
            w = mn * pb
        p = (
            sum(nf4_bytes(m * r, a.block_size, a.double_quant) for (m, _), r in zip(mats, ranks, strict=True))
            if a.quantize_projection and method == "loqt"
            else small * pb
        )
        weights, trainable = w + p + large * pb, [n * r for (_, n), r in zip(mats, ranks, strict=True)]
        states = adam_bytes(trainable + others, a)
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method})")
    weights += sum(others) * pb
    grads = trainable + others
    gradients = (max(grads) if a.per_layer else sum(grads)) * gb
    return Estimate(
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=activation_bytes(shape, vocab, batch, seq, rank, method, a),
        refresh_capture=mn * 4 if method in ("loqt", "loqt-nq") else 0.0,
    )


def largest_batch(
    size: str, method: str, rank: int, budget_gib: float, vocab: int, seq: int, a: Assumptions
) -> int:
    """The largest micro-batch whose steady-state total fits `budget_gib` (0 if none)."""
    fits = lambda b: estimate(size, method, rank, vocab, b, seq, a).total <= budget_gib * GIB
    batch = 0
    while fits(batch + 1) and batch < 4096:
        batch += 1
    return batch


def table(size: str, rank: int, vocab: int, batch: int, seq: int, a: Assumptions, methods=METHODS) -> str:
    rows = {m: estimate(size, m, rank, vocab, batch, seq, a) for m in methods}
    names = {"full": "full-rank", "lora": "LoRA", "galore": "GaLore", "loqt": "LoQT", "loqt-nq": "LoQT-nq"}
    lines = [f"| GiB | {' | '.join(names[m] for m in methods)} |", "|---" * (len(methods) + 1) + "|"]
    for label, get in (
        ("weights", lambda e: e.weights),
        ("gradients", lambda e: e.gradients),
        ("optimizer states", lambda e: e.optimizer_states),
        (f"activations (batch {batch} x seq {seq})", lambda e: e.activations),
        ("total", lambda e: e.total),
        ("+ refresh-step gradient capture", lambda e: e.refresh_capture),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{get(rows[m]) / GIB:.2f}" for m in methods) + " |")
    return "\n".join(lines)
