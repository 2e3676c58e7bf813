"""LoQT: a frozen NF4 weight plus a trainable low-rank factor, merged back on a schedule.

    y = x · deq(Wq)ᵀ + s · (B·P applied to x)        s = lora_alpha, as-is

P (frozen, optionally NF4) sits on the smaller side of W (out x in) and B
(trainable) on the larger one, so optimizer state is 2·max(out, in)·r. P comes
from the top-r singular vectors of the gradient of W over one optimizer step;
B starts from LoftQ-style compensation of the quantization error. At a merge,
W <- NF4(deq W + s·B·P) and B is recompensated (P refreshed or kept).

This module is pure torch + quant.py. The trainer applies the B it returns
through its engine (which owns the optimizer's fp32 master copy) and
all-reduces the captured gradients before they reach `LoQTLinear.update`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import DEFAULT_LORA_ALPHA, LoQTConfig
from .quant import NF4Tensor


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with `x` runs in: autocast's where it is on (so W is dequantized straight
    into it, never into a dense fp32 temporary that autocast would cast down again), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LoQTMatmul(torch.autograd.Function):
    """y = x·Wᵀ + s·(B·P applied to x) as one autograd node with a hand-written backward.

    One node because on a GPU a small model's LoQT step is bound by launches and Python, not by
    arithmetic: composed from F.linear the layer is six autograd nodes and seven more kernels per
    forward and backward (bench/bench_overhead.py). Here the low-rank part adds two matmuls
    forward (the second accumulating into y) and three backward.
    Nothing dense is saved for backward (W is dequantized again there), only x or the rank-r
    product the gradients need. On capture steps x is saved too and the layer is given dYᵀ·X
    (LoQTLinear.capture_gradient), since an NF4 tensor cannot hold .grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, b: torch.Tensor, layer: LoQTLinear, capture: bool) -> torch.Tensor:
        dtype = compute_dtype(x)  # (grad and autocast decisions are taken outside: grad mode is off here)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        b_c, p = b.to(dtype), layer.projection_matrix(dtype)
        y = x2 @ layer.dense_weight(dtype).T
        if layer.p_is_a:  # y += s·(x·Pᵀ)·Bᵀ; B's gradient needs x·Pᵀ, not x
            t = x2 @ p.T
            y.addmm_(t, b_c.T, alpha=layer.scale)
            saved = x2 if capture else None
        else:  # y += s·(x·Bᵀ)·Pᵀ; B's gradient needs x
            t = x2 @ b_c.T
            y.addmm_(t, p.T, alpha=layer.scale)
            saved, t = x2, None
        ctx.layer, ctx.capture = layer, capture
        ctx.x_shape, ctx.x_dtype, ctx.b_dtype = x.shape, x.dtype, b.dtype
        ctx.save_for_backward(saved, t, b_c)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer, s = ctx.layer, ctx.layer.scale
        x2, t, b_c = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(b_c.dtype)
        if ctx.capture:
            layer.capture_gradient(g, x2)
        p = layer.projection_matrix(b_c.dtype)
        grad_x = grad_b = None
        # the output gradient on the rank-r side: g·B when P = A, else g·P
        u = g @ b_c if layer.p_is_a else g @ p
        if ctx.needs_input_grad[0]:
            grad_x = g @ layer.dense_weight(b_c.dtype)
            grad_x.addmm_(u, p if layer.p_is_a else b_c, alpha=s)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # s·gᵀ·t (P = A) or s·uᵀ·x in one kernel: with beta=0 addmm only takes b_c's shape
            left, right = (g.T, t) if layer.p_is_a else (u.T, x2)
            grad_b = torch.addmm(b_c, left, right, beta=0, alpha=s).to(ctx.b_dtype)
        return grad_x, grad_b, None, None


def svd_gesvda(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """torch.linalg.svd(g, full_matrices=False) through cuSOLVER's gesvda, or None where it fails
    (torch raises, or the values are not finite: one host sync), with a warning that says why.
    It is several times faster than the default CUDA driver on a refresh's matrices and keeps
    their top-r subspace as exactly (docs/gpu.md); it approximates the smallest singular values."""
    try:
        u, s, vh = torch.linalg.svd(g, full_matrices=False, driver="gesvda")
    except RuntimeError as e:  # a CUDA error that is not cuSOLVER's would resurface at the next call
        warnings.warn(f"gesvda failed on a {tuple(g.shape)} matrix; another SVD is used: {e}", stacklevel=2)
        return None
    if torch.isfinite(s).all():
        return u, s, vh
    warnings.warn(
        f"gesvda gave non-finite values for a {tuple(g.shape)} matrix; another SVD is used", stacklevel=2
    )
    return None


def reduced_svd(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(g, full_matrices=False); on CUDA gesvda's, the default driver's if it fails."""
    return (g.is_cuda and svd_gesvda(g)) or torch.linalg.svd(g, full_matrices=False)


def top_right_singular_vectors(g: torch.Tensor, k: int, rank_bound: int | None = None) -> torch.Tensor:
    """The top-k right singular vectors of g (m x n, m >= n) as rows: what a refresh's P is made of.
    On CUDA gesvda's, unless g is known to be rank-deficient (`rank_bound` < n: a gradient summed
    over fewer tokens than that) or gesvda fails; then the eigenvectors of gᵀ·g (n x n), never
    the default driver's SVD, which can take minutes on a rank-deficient 7B gradient (a step of
    fewer tokens than P's side). eigh converges on any symmetric matrix and is fast; squaring g
    blurs only directions whose singular values are ~1e-3 of the largest or less, and past its
    rank a rank-deficient g has no preferred vectors anyway."""
    if g.is_cuda:
        deficient = rank_bound is not None and rank_bound < min(g.shape)
        svd = None if deficient else svd_gesvda(g)
        if svd is not None:
            return svd[2][:k]
        return gram_top_vectors(g, k)
    return torch.linalg.svd(g, full_matrices=False)[2][:k]


def gram_top_vectors(g: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of g as rows, from the eigenvectors of gᵀ·g."""
    return torch.linalg.eigh(g.T @ g)[1][:, -k:].flip(1).T  # eigh's values ascend


def pseudo_inverse(a: torch.Tensor) -> torch.Tensor:
    """torch.linalg.pinv(a) (same cutoff: singular values at or below max(m, n)·eps of the largest
    are dropped), through reduced_svd: a merge takes P's pseudo-inverse for every wrapped layer,
    so on CUDA it should not pay the default driver's price."""
    u, s, vh = reduced_svd(a)
    cutoff = s.max() * max(a.shape) * torch.finfo(s.dtype).eps
    return (vh.T * torch.where(s > cutoff, s.reciprocal(), torch.zeros_like(s))) @ u.T


def compensate(
    w_fp: torch.Tensor, proj: torch.Tensor, scale: float, iters: int, p_is_a: bool, roundtrip
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ-style: find (target, B) so that roundtrip(target) + s·B·P is closest to w_fp.

    Returns the matrix to quantize and B. With iters = 0: (w_fp, 0)."""
    b_shape = (w_fp.shape[0], proj.shape[0]) if p_is_a else (proj.shape[1], w_fp.shape[1])
    if iters == 0:
        return w_fp, w_fp.new_zeros(b_shape)
    pinv = pseudo_inverse(proj)
    low_rank = (lambda b: b @ proj) if p_is_a else (lambda b: proj @ b)
    target, best = w_fp, None
    for _ in range(iters):
        deq = roundtrip(target)
        residual = w_fp - deq
        b = (residual @ pinv if p_is_a else pinv @ residual) / scale
        err = torch.linalg.matrix_norm(residual - scale * low_rank(b))
        if best is None or err < best[0]:
            best = (err, target, b)
        target = w_fp - scale * low_rank(b)
    return best[1], best[2]


class LoQTLinear(nn.Module):
    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        lora_alpha: float,
        quantize: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        quantize_projection: bool = False,
    ):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("LoQTLinear wraps bias-free linears (LLaMA's)")
        self.out_features, self.in_features = linear.weight.shape
        self.rank = min(rank, self.in_features, self.out_features)
        self.scale = lora_alpha
        self.p_is_a = self.in_features <= self.out_features  # P = A (r x in) when the input side is smaller
        self.quantize, self.quantize_projection = quantize, quantize_projection
        self.nf4 = dict(block_size=block_size, double_quant=double_quant)
        w = linear.weight.detach().float()
        if quantize:
            self.weight_q = NF4Tensor(w, **self.nf4)
            # The weight before quantization, kept (off the state_dict, in host memory) until the
            # first update compensates against it: the paper quantizes W with error compensation
            # at step 0. In bf16: its rounding (2^-9 relative) is far below NF4's error (about
            # 0.1), and a 7B model's copy is then 12 GiB of host memory, not 24.
            self.initial_weight: torch.Tensor | None = w.detach().to("cpu", torch.bfloat16, copy=True)
        else:
            self.register_buffer("weight_fp", w.clone())
        p_shape = (self.rank, self.in_features) if self.p_is_a else (self.out_features, self.rank)
        self.projection_shape = p_shape
        p0 = torch.zeros(p_shape, device=w.device)  # set by the first refresh (step 0); B·P = 0 until then
        if quantize_projection:
            self.projection_q = NF4Tensor(p0, **self.nf4)
        else:
            self.register_buffer("projection", p0)
        b_shape = (self.out_features, self.rank) if self.p_is_a else (self.rank, self.in_features)
        self.B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=linear.weight.dtype))
        self.capture: str | None = None  # the capture under way: None, "exact", "offload" or "layerwise"
        self.grad_buffer: torch.Tensor | None = None  # exact capture: the step's dense gradient
        self.host_buffer: torch.Tensor | None = None  # offload capture: the same in host memory
        self.host_filled = False  # whether this step's first micro-batch reached host_buffer yet
        self.reduce = None  # layerwise capture: averages a gradient over ranks, set by start_capture
        self.capture_tokens: int | None = None  # how many tokens a captured gradient sums over
        # layerwise capture: the new P, held as P is stored (NF4 or dense) until the merge takes it
        self.pending_projection: torch.Tensor | NF4Tensor | None = None

    # -- the matrices
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_q.dequantize(dtype) if self.quantize else self.weight_fp.to(dtype)

    def projection_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.projection_q.dequantize(dtype) if self.quantize_projection else self.projection.to(dtype)

    def delta(self, b: torch.Tensor | None = None) -> torch.Tensor:
        """s·B·P in W's (out x in) orientation, float32."""
        b = (self.B if b is None else b).detach().float()
        p = self.projection_matrix()
        return self.scale * (b @ p if self.p_is_a else p @ b)

    @property
    def capturing(self) -> bool:
        # Only training forwards that build a graph: evaluation never touches the buffer.
        return self.capture is not None and self.training and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LoQTMatmul.apply(x, self.B, self, self.capturing)

    # -- refresh and merge
    def start_capture(self, how: str = "exact", reduce=None, tokens: int | None = None) -> None:
        """Capture this step's gradient of W, summed over its micro-batches, for a refresh.

        exact: every micro-batch's dYᵀ·X is added into a dense fp32 buffer on W's device, alive
            until the merge takes it (every wrapped layer's at once).
        offload: the same sum in a bf16 buffer in host memory (pinned next to a GPU), alive from
            the first micro-batch to the merge; the device holds one layer's dYᵀ·X at a time,
            inside backward. bf16 keeps the top-r subspace (docs/benchmarks.md) at half fp32's
            bytes.
        layerwise: the step has one micro-batch, so backward reduces this layer's gradient with
            `reduce` (a mean over data-parallel ranks), keeps only its top-r singular vectors and
            frees it; one layer's gradient exists at a time.
        `tokens`, the step's count over micro-batches and ranks, bounds the gradient's rank (see
        projection_from)."""
        if how not in ("exact", "offload", "layerwise"):
            raise ValueError(f"unknown capture {how!r}")
        self.capture, self.capture_tokens = how, tokens
        self.reduce = (reduce or (lambda g: g)) if how == "layerwise" else None
        if how == "exact":
            self.grad_buffer = torch.zeros(self.out_features, self.in_features, device=self.B.device)
        self.host_filled = False

    def capture_gradient(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """One micro-batch's dYᵀ·X (2-d: tokens x features), in float32."""
        if self.capture == "exact":
            self.grad_buffer.addmm_(grad_out.float().T, x.float())
            return
        grad = grad_out.float().T @ x.float()
        if self.capture == "offload":
            self._add_to_host(grad)
            return
        grad = self.reduce(grad)
        if not torch.isfinite(grad).all():  # before anything merges it (the trainer says so, with the step)
            raise FloatingPointError("the refresh gradient is not finite")
        self.pending_projection = self.stored_projection(self.projection_from(grad))

    def _add_to_host(self, grad: torch.Tensor) -> None:
        """host_buffer (+)= grad. On a GPU the sum is taken there, in fp32, and copied back: the
        copies are queued on the stream, so the host never waits and later kernels see them done."""
        if not self.host_filled:
            shape = (self.out_features, self.in_features)
            self.host_buffer = torch.empty(shape, dtype=torch.bfloat16, pin_memory=grad.is_cuda)
            self.host_buffer.copy_(grad, non_blocking=True)
        elif grad.is_cuda:
            total = self.host_buffer.to(grad.device, non_blocking=True).float().add_(grad)
            self.host_buffer.copy_(total, non_blocking=True)
        else:
            self.host_buffer.add_(grad)
        self.host_filled = True

    def take_gradient(self) -> torch.Tensor | None:
        """The step's summed gradient of W in float32 on W's device, from an exact or offload
        capture (None under layerwise capture, or when backward never reached this layer);
        capturing ends."""
        grad = self.grad_buffer
        if self.capture == "offload" and self.host_filled:
            grad = self.host_buffer.to(self.B.device, non_blocking=True).float()
        self.grad_buffer, self.host_buffer, self.capture, self.host_filled = None, None, None, False
        return grad

    def stored_projection(self, p: torch.Tensor) -> torch.Tensor | NF4Tensor:
        """P as this layer stores it: NF4 (quantize_projection) or dense in P's dtype. A layerwise
        refresh holds every layer's new P from backward to the merge, so in this form: at 7B an
        fp32 copy of every P would be several GB more."""
        return NF4Tensor(p, **self.nf4) if self.quantize_projection else p.to(self.projection.dtype)

    def take_projection(self) -> torch.Tensor | NF4Tensor | None:
        """The layerwise capture's new P, as stored_projection made it (None under exact capture);
        capturing ends."""
        p, self.pending_projection, self.capture = self.pending_projection, None, None
        return p

    def projection_from(self, grad: torch.Tensor) -> torch.Tensor:
        """P from the SVD of a gradient: its top-r singular vectors on P's (the smaller) side."""
        grad = grad.float()
        if self.p_is_a:
            return top_right_singular_vectors(grad, self.rank, self.capture_tokens)
        return top_right_singular_vectors(grad.T, self.rank, self.capture_tokens).T

    def update(
        self,
        b_current: torch.Tensor | None,
        grad: torch.Tensor | None,
        compensation_iters: int,
        projection: torch.Tensor | NF4Tensor | None = None,
    ) -> torch.Tensor:
        """Merge s·B·P into W; refresh P (from `grad`'s SVD, or a `projection` already taken from
        one, dense or as stored_projection made it); recompensate.

        Sets W (requantized) and P here and returns the new B for the caller's
        engine to install. `b_current` is B's full-precision value (the optimizer's
        master copy); None reads the parameter."""
        base = self.dense_weight()
        if self.quantize and self.initial_weight is not None:
            base, self.initial_weight = self.initial_weight.to(base.device).float(), None
        w_fp = base + self.delta(b_current)
        del base  # one dense temporary fewer while compensation runs
        p = self.projection_from(grad) if grad is not None else projection
        if isinstance(p, NF4Tensor):
            self.projection_q.copy_(p)
        elif p is not None and self.quantize_projection:
            self.projection_q.quantize_(p)
        elif p is not None:
            self.projection.copy_(p)
        if not self.quantize:  # LoQT-nq: the merge is exact, nothing to compensate
            self.weight_fp.copy_(w_fp)
            return torch.zeros_like(self.B, dtype=torch.float32)
        roundtrip = lambda w: NF4Tensor(w, **self.nf4).dequantize()
        target, b = compensate(
            w_fp, self.projection_matrix(), self.scale, compensation_iters, self.p_is_a, roundtrip
        )
        self.weight_q.quantize_(target)
        return b

    def extra_repr(self) -> str:
        side = "A (r x in)" if self.p_is_a else "(out x r)"
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale}, "
            f"P={side}, nf4={self.quantize}"
        )


def apply_loqt(model: nn.Module, cfg: LoQTConfig, device: torch.device | str | None = None) -> nn.Module:
    """Wrap the target linears of `model` in place; method 'full' leaves it untouched. With a
    device, each linear moves there before it is quantized: NF4 quantization runs on the GPU (a 7B
    model's is minutes on a CPU), and the device never holds more than one dense weight. A
    lora_alpha of none takes DEFAULT_LORA_ALPHA: the module does not know its registry size, whose
    measured default Config.settled_loqt() gives."""
    if cfg.method == "full":
        return model
    scale = DEFAULT_LORA_ALPHA if cfg.lora_alpha is None else cfg.lora_alpha
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets
    ]
    for name, linear in targets:
        parent_name, child = name.rsplit(".", 1)
        layer = LoQTLinear(
            linear if device is None else linear.to(device),
            cfg.rank,
            scale,
            quantize=cfg.method == "loqt",
            block_size=cfg.quant_block_size,
            double_quant=cfg.double_quant,
            quantize_projection=cfg.quantize_projection and cfg.method == "loqt",  # loqt-nq: nothing in NF4
        )
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def loqt_layers(model: nn.Module) -> list[tuple[str, LoQTLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoQTLinear)]


def expected_trainable_parameters(model: nn.Module) -> int:
    """The paper's count: r·max(out, in) per wrapped layer plus every unwrapped parameter."""
    wrapped = loqt_layers(model)
    inside = {id(p) for _, layer in wrapped for p in layer.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return other + sum(layer.rank * max(layer.in_features, layer.out_features) for _, layer in wrapped)
