"""Training-memory estimates: what this trainer allocates, and the paper's accounting.

`trainer_estimate(cfg)` (what `loqt-ray memory` prints by default) counts what one worker
of this trainer holds for a config: the engine launch.py picks (plain with per-layer updates,
else DeepSpeed ZeRO with its master copies and sharding), values as the model stores them,
the optimizer's states, activations, and the refresh method's extra on refresh steps.
bench/bench_memory.py checks it against measured peaks.

The paper's accounting (`estimate`, `loqt-ray memory --paper`) follows its Table 3, for each
wrapped m x n matrix (m <= n):

    method    weights                       gradients   optimizer states
    full      mn                            mn          2mn
    LoRA      mn + mr + nr                  mr + nr     2mr + 2nr
    GaLore    mn                            mn          mr + 2nr   (P and the projected moments)
    LoQT      NF4(mn) + mr + nr             nr          2nr        (P on the small side, B on the large)
    LoQT-nq   mn + mr + nr                  nr          2nr

Every other parameter (embeddings, lm_head, norms) is trained full-rank with
Adam by every method, as in this trainer and the paper. NF4 bytes are exact
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
# DeepSpeed's default ZeRO bucket, in elements. ZeRO-1/2 allocate a whole bucket at every
# backward however few values there are to reduce (0.93 GiB of bf16 beside a 60m LoQT model's
# 0.04 GiB of trainable values), so distributed.py asks for no more than the values it reduces.
ZERO_BUCKET = 500_000_000


def zero_bucket(trainable: int) -> int:
    """The ZeRO reduce/all-gather bucket for `trainable` values (elements): one holds them all."""
    return min(ZERO_BUCKET, trainable)


@dataclass(frozen=True)
class Assumptions:
    param_bytes: float = 2.0  # full-precision weights, P, B, LoRA factors
    grad_bytes: float = 2.0
    state_bytes: float = 2.0  # each Adam moment (adamw); 8-bit Adam ignores it
    activation_bytes: float = 2.0
    optimizer: str = "adamw"
    step_counter_bytes: float = 0.0  # torch AdamW keeps an fp32 step per tensor (4); the paper ignores it
    qmap_bytes: float = 0.0  # bitsandbytes keeps two 256-entry fp32 code maps per 8-bit state (2048)
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
            total += 2 * (n + 4 * math.ceil(n / BNB_8BIT_BLOCK)) + a.qmap_bytes
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


# ---------------------------------------------------------------- this trainer's accounting


@dataclass(frozen=True)
class TrainerEstimate:
    """What this trainer allocates on one worker for a config (bytes), and how it was counted."""

    engine: str  # the engine and storage, in words
    weights: float  # NF4 W with its quant state, P, and every trainable value as the model holds it
    master: float  # fp32 copies of trainable values an optimizer steps instead (DeepSpeed bf16/ZeRO)
    gradients: float
    optimizer_states: float
    step_temporaries: float  # what an optimizer step allocates besides its states
    activations: float  # saved for backward at the config's micro-batch
    refresh: float  # held on refresh steps on top of the steady peak (the gradient capture)
    merge: float  # the merge's own peak, before the optimizer step (no activations or gradients held)
    graphs: float  # train.cuda_graphs: refresh steps' eager pass beside the recording's
    host: float  # a GPU run's host memory at step 0: fp32 weights for compensation, offload buffers

    @property
    def steady(self) -> float:
        parts = (self.weights, self.master, self.gradients, self.optimizer_states, self.step_temporaries)
        return sum(parts) + self.activations

    @property
    def peak(self) -> float:
        return max(self.steady + self.refresh + self.graphs, self.merge)


def saved_activation_bytes(
    shape: ModelShape,
    vocab: int,
    tokens: int,
    rank: int,
    low_rank: bool,
    width: float,
    checkpoint_width: float | None = None,
) -> float:
    """What transformers' LlamaForCausalLM (SDPA attention) saves for backward in this trainer,
    from its saved tensors (tests/test_memory.py checks it with saved_tensors_hooks, within 5 %):
    per layer, the two RMSNorm inputs upcast to fp32 (2h) and, in the compute dtype, about 6h
    more (normalized values, q, k, v, the attention output; SDPA's CPU kernels save slightly
    different sets by shape, between about 5h and 6.5h), gate, SiLU, up and their product
    (4i), and the LoQT factors' r-wide intermediates (about 6r); then the final norm, and the
    loss's fp32 log-softmax plus, at the start of backward, the gradients of the logits: two fp32
    ones (log-softmax's incoming and outgoing gradient) and one in the compute dtype. (A count of
    saved tensors cannot see those transients; GPU peaks show them, docs/gpu.md.)

    With activation checkpointing (`checkpoint_width`: the bytes of the residual stream's values,
    the model's parameter dtype) only each block's input is kept; backward first runs through
    the loss and the final norm, which free their part, and then recomputes one block's set at a
    time, so the larger of the two counts (bench/bench_memory.py measures it)."""
    per_layer = 2 * shape.hidden * 4 + (6 * shape.hidden + 4 * shape.intermediate) * width
    if low_rank:
        per_layer += 6 * rank * width
    head = shape.hidden * (4 + width) + vocab * (4 + 4 + 4 + width)  # the final norm, the logits
    if checkpoint_width is None:
        return tokens * (shape.layers * per_layer + head)
    return tokens * (shape.layers * shape.hidden * checkpoint_width + max(per_layer, head))


def svd_bytes(mats: list[tuple[int, int]]) -> float:
    """One layer's refresh at a time: its fp32 gradient and SVD factors (torch.linalg.svd, reduced:
    U m x k, Vh k x n, k = min(m, n)), for the largest layer."""
    return 4.0 * max(2 * m * n + m * m + m for m, n in mats)  # G and Vh (m x n), U (m x m), S


def host_refresh_bytes(cfg: Config, mats: list[tuple[int, int]]) -> float:
    """The offload capture's bf16 buffers in host memory, one per wrapped W, on refresh steps."""
    if cfg.loqt.method == "full" or cfg.refresh_method() != "offload":
        return 0.0
    return 2.0 * sum(m * n for m, n in mats)


def held_to_merge_bytes(cfg: Config, mats: list[tuple[int, int]], projections: float) -> float:
    """What a refresh step holds on the device from backward to the merge. Exact capture: every
    wrapped W's fp32 gradient. Offload: nothing on a GPU (the buffers are in host memory); on the
    CPU, where host memory is the device's, the buffers. Layerwise: every layer's new P, as P is
    stored (`projections`: the bytes of them all)."""
    method = cfg.refresh_method()
    if cfg.loqt.method == "full":
        return 0.0
    if method == "exact":
        return 4.0 * sum(m * n for m, n in mats)
    if method == "offload":
        return 0.0 if cfg.scale.use_gpu else host_refresh_bytes(cfg, mats)
    return projections


def capture_bytes(cfg: Config, mats: list[tuple[int, int]]) -> float:
    """One layer's transient inside a refresh step's backward. Offload: its fp32 dYᵀX, and on a GPU
    the host buffer's sum brought over in fp32 and its bf16 copy back. Layerwise: its gradient and
    SVD. Exact adds into its buffers in place."""
    method, largest = cfg.refresh_method(), max(m * n for m, n in mats)
    if cfg.loqt.method == "full" or method == "exact":
        return 0.0
    if method == "offload":
        return (4 + 4 + 2) * largest if cfg.scale.use_gpu else 4.0 * largest
    return svd_bytes(mats)


def merge_temporaries(cfg: Config, mats: list[tuple[int, int]]) -> float:
    """One layer's merge at a time, for the largest: the SVD of an exact or offload capture, then
    W_fp and the dense temporaries of requantization and compensation, about eight fp32 copies of W
    with NF4 (measured on the CPU), three for loqt-nq's exact merge."""
    largest = max(m * n for m, n in mats)
    dense = (8 if cfg.loqt.method == "loqt" else 3) * 4.0 * largest
    at_merge = cfg.refresh_method() in ("exact", "offload")
    return max(dense, svd_bytes(mats) if at_merge else 0.0)


def graphs_bytes(cfg: Config, activations: float, gradients: float) -> float:
    """train.cuda_graphs' extra on refresh steps: those run eagerly while the recording's memory
    pool keeps the activations and gradients of the recorded pass, so they need their own."""
    if not cfg.train.cuda_graphs or cfg.loqt.method == "full":
        return 0.0
    return activations + gradients


def step_temporaries(cfg: Config, largest: int, state_width: float) -> float:
    """What one optimizer step allocates besides its states, for the largest tensor it steps.
    torch's AdamW (tensor by tensor on the CPU and under per-layer updates): the denominator and
    the update. bitsandbytes' 8-bit Adam: nothing on CUDA (a fused in-place kernel); on the CPU
    its torch fallback dequantizes both states and copies the gradient and the parameter to
    fp32, then takes a square root and a quotient: six fp32 tensors of that size."""
    if cfg.optim.name == "adam8bit":
        return 0.0 if cfg.scale.use_gpu else 6 * 4.0 * largest
    return 2 * state_width * largest


def _projection_bytes(cfg: Config, mats: list[tuple[int, int]], ranks: list[int], width: float) -> float:
    """Every wrapped matrix's P as it is stored: NF4 with its quant state, or dense."""
    if cfg.loqt.method == "full":
        return 0.0
    p_sizes = [m * r for (m, _), r in zip(mats, ranks, strict=True)]
    if cfg.loqt.quantize_projection and cfg.loqt.method == "loqt":
        return sum(nf4_bytes(size, cfg.loqt.quant_block_size, cfg.loqt.double_quant) for size in p_sizes)
    return width * sum(p_sizes)


def _frozen_weight_bytes(cfg: Config, mats: list[tuple[int, int]], width: float) -> float:
    """The wrapped matrices' W: NF4 with its quant state, or dense for loqt-nq."""
    if cfg.loqt.method == "full":
        return 0.0
    if cfg.loqt.method == "loqt":
        return sum(nf4_bytes(m * n, cfg.loqt.quant_block_size, cfg.loqt.double_quant) for m, n in mats)
    return width * sum(m * n for m, n in mats)


def _optimizer_assumptions(cfg: Config, state_width: float) -> Assumptions:
    if cfg.optim.name == "adam8bit":  # bitsandbytes counts steps in a Python int, maps its codes per tensor
        return Assumptions(optimizer="adam8bit", qmap_bytes=2 * 256 * 4)
    # torch AdamW: moments like the values they step, an fp32 step tensor per parameter
    return Assumptions(state_bytes=state_width, optimizer="adamw", step_counter_bytes=4.0)


def _engine_words(cfg: Config, width: float, master: float) -> str:
    scale = cfg.scale
    engine = (
        "plain engine, per-layer updates"
        if cfg.optim.per_layer
        else (f"DeepSpeed ZeRO-{scale.zero_stage} over {scale.num_workers} worker(s)")
    )
    engine += f", {cfg.optim.name}, {'bf16' if width == 2 else 'fp32'} trainable values"
    engine += ", fp32 master copy" if master else ""
    engine += ", activation checkpointing" if cfg.train.activation_checkpointing else ""
    return engine + f", {cfg.refresh_method()} refresh"


def trainer_estimate(cfg: Config, batch: int | None = None) -> TrainerEstimate:
    """Bytes one worker of this trainer holds for `cfg` (micro-batch `batch`, default the config's).

    Engines as launch.py picks them: per-layer updates run the plain engine, everything else
    DeepSpeed (ZeRO stage `scale.zero_stage` over `scale.num_workers`; bf16 on a GPU with
    train.dtype bfloat16, which keeps an fp32 master copy; ZeRO >= 1 keeps its fp32 partitions
    too). Trainable values are fp32 unless train.master_weights is false (then bf16, no copy)."""
    shape = MODEL_SIZES[cfg.model.size]
    mats = [(min(o, i), max(o, i)) for o, i in shape.linear_shapes()]  # (m, n), m <= n
    ranks = [min(cfg.loqt.rank, m) for m, _ in mats]
    others = shape.other_tensors(cfg.data.vocab_size)
    if cfg.loqt.method == "full":
        trainable = [m * n for m, n in mats] + others
    else:
        trainable = [n * r for (_, n), r in zip(mats, ranks, strict=True)] + others
    plain = cfg.optim.per_layer
    bf16_deepspeed = not plain and cfg.scale.use_gpu and cfg.train.dtype == "bfloat16"
    width = 2.0 if (not cfg.train.master_weights or bf16_deepspeed) else 4.0  # values as the model holds them
    count = sum(trainable)
    sharded = not plain and cfg.scale.zero_stage >= 1
    shards = cfg.scale.num_workers if sharded else 1
    master = 4.0 * count / shards if (bf16_deepspeed or sharded) else 0.0
    state_width = 4.0 if (master or width == 4.0) else width
    tokens = (batch or cfg.train.micro_batch_size) * cfg.data.seq_len
    compute = 2.0 if cfg.train.dtype == "bfloat16" else 4.0
    checkpointed = width if cfg.train.activation_checkpointing else None
    activations = saved_activation_bytes(
        shape, cfg.data.vocab_size, tokens, cfg.loqt.rank, cfg.loqt.method != "full", compute, checkpointed
    )
    # Per-layer updates free each gradient inside backward; with one micro-batch per step only one
    # exists at a time, with accumulation every gradient is held from the first micro-batch to the
    # last. Otherwise every parameter's .grad exists during backward, and ZeRO reduces it through
    # its bucket into the shard (ZeRO-1 stages it in fp32, ZeRO-2 in the values' width).
    one_at_a_time = plain and cfg.train.grad_accum == 1
    projections = _projection_bytes(cfg, mats, ranks, width)
    weights = _frozen_weight_bytes(cfg, mats, width) + projections + width * count
    states = adam_bytes(trainable, _optimizer_assumptions(cfg, state_width)) / shards
    held = held_to_merge_bytes(cfg, mats, projections)
    low_rank = cfg.loqt.method != "full"
    return TrainerEstimate(
        engine=_engine_words(cfg, width, master),
        weights=weights,
        master=master,
        gradients=width * (max(trainable) if one_at_a_time else count)
        + (zero_bucket(count) * (4.0 if cfg.scale.zero_stage == 1 else width) if sharded else 0.0),
        optimizer_states=states,
        step_temporaries=step_temporaries(cfg, max(trainable), state_width),
        activations=activations,
        refresh=held + capture_bytes(cfg, mats) if low_rank else 0.0,
        merge=weights + master + states + held + merge_temporaries(cfg, mats) if low_rank else 0.0,
        graphs=graphs_bytes(cfg, activations, width * count),
        host=host_bytes(cfg, mats),
    )


def host_bytes(cfg: Config, mats: list[tuple[int, int]]) -> float:
    """What a GPU run holds in host memory at its peak, step 0 (0 on the CPU, where the device's
    memory is the host's): the wrapped layers' weights before quantization (bf16), kept for step
    0's compensation, and the offload capture's buffers of that first refresh."""
    if not cfg.scale.use_gpu:
        return 0.0
    initial = 2.0 * sum(m * n for m, n in mats) if cfg.loqt.method == "loqt" else 0.0
    return initial + host_refresh_bytes(cfg, mats)


def host_memory_shortfall(cfg: Config, nodes: list[tuple[float, float]]) -> str | None:
    """Why the nodes (each one's host memory in bytes and its GPUs) cannot hold the run's workers'
    host memory at step 0, or None when they can: each node takes as many workers as both its
    GPUs and its memory allow."""
    need = trainer_estimate(cfg).host
    if need == 0:
        return None
    per_gpu = cfg.scale.gpus_per_worker if cfg.scale.use_gpu else 0
    placeable = sum(
        min(int(memory // need), int(gpus // per_gpu) if per_gpu else cfg.scale.num_workers)
        for memory, gpus in nodes
    )
    if placeable >= cfg.scale.num_workers:
        return None
    largest = max((memory for memory, _ in nodes), default=0.0)
    return (
        f"each worker needs {need / GIB:.1f} GiB of host memory at step 0 (the weights kept for "
        f"compensation, and the refresh buffers of loqt.refresh={cfg.refresh_method()}), and the nodes "
        f"hold {placeable} of the run's {cfg.scale.num_workers} worker(s) (the largest has "
        f"{largest / GIB:.1f} GiB)"
    )


def fit_shortfall(cfg: Config) -> str | None:
    """ "does not fit: peak X GiB > Y GiB" when the refresh-step peak is over the worker's GPU share
    (scale.gpu_memory_gb x scale.gpus_per_worker); None when it fits or no GPU memory is given."""
    if not cfg.scale.use_gpu or cfg.scale.gpu_memory_gb is None or cfg.model.path is not None:
        return None
    share = cfg.scale.gpu_memory_gb * cfg.scale.gpus_per_worker
    peak = trainer_estimate(cfg).peak / GIB
    return f"does not fit: peak {peak:.2f} GiB > {share:.2f} GiB" if peak > share else None


def largest_trainer_batch(cfg: Config, budget_gib: float) -> tuple[int, float]:
    """The largest micro-batch whose refresh-step peak fits `budget_gib` (0 if none), and that peak."""
    batch = 0
    while batch < 4096 and trainer_estimate(cfg, batch + 1).peak <= budget_gib * GIB:
        batch += 1
    return batch, trainer_estimate(cfg, max(batch, 1)).peak


def trainer_table(e: TrainerEstimate, batch: int, seq: int) -> str:
    rows = [
        ("weights (NF4 W + quant state, P, trainable values)", e.weights),
        ("fp32 master copy", e.master),
        ("gradients", e.gradients),
        ("optimizer states", e.optimizer_states),
        ("optimizer step temporaries", e.step_temporaries),
        (f"activations (batch {batch} x seq {seq})", e.activations),
        ("steady-step peak", e.steady),
        ("+ refresh steps (the gradient capture)", e.refresh),
        ("merge, before the step (weights, states, capture, one layer's merge)", e.merge),
    ]
    if e.graphs:
        rows.append(("+ refresh steps' eager pass beside the CUDA graphs recording", e.graphs))
    rows.append(("refresh-step peak", e.peak))
    if e.host:
        rows.append(("host memory at step 0 (weights kept for compensation, offload buffers)", e.host))
    return "\n".join(["| GiB | this trainer |", "|---|---|"] + [f"| {k} | {v / GIB:.2f} |" for k, v in rows])


# ---------------------------------------------------------------- the paper's accounting


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
