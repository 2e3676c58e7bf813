import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loqt_ray import LoQTConfig, LoQTLinear, apply_loqt, update_steps
from loqt_ray.config import NF4_BLOCK_SIZES
from loqt_ray.loqt import expected_trainable_parameters, loqt_layers
from loqt_ray.models import build_model
from loqt_ray.quant import NF4Tensor
from loqt_ray.schedule import UpdateSchedule


def make_layer(out_f, in_f, rank=8, seed=0, **kw):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    return linear, LoQTLinear(linear, rank, lora_alpha=0.5, **kw)


def randomize_adapter(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    layer.projection.copy_(torch.randn(layer.projection.shape, generator=g))
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.01)


def effective_weight(layer):
    return layer.dense_weight() + layer.delta()


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_forward_is_dequantized_weight_plus_scaled_low_rank(shape):
    _, layer = make_layer(*shape)
    randomize_adapter(layer)
    x = torch.randn(3, 5, shape[1])
    p, b = layer.projection, layer.B.detach()
    bp = b @ p if layer.p_is_a else p @ b
    expected = x @ layer.weight_q.dequantize().T + 0.5 * x @ bp.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.B.shape[0 if layer.p_is_a else 1] == max(shape)  # B on the larger side
    assert min(shape) in layer.projection.shape  # P on the smaller side


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_hand_written_backward_matches_autograd_of_the_formula(shape, capture, autocast):
    """The layer's one-node forward/backward gives the output and the x and B gradients that
    autograd gives for x·Wᵀ + s·(B·P)(x) written with F.linear, on both sides of P, on capture
    steps and under bf16 autocast (x stays fp32 there, as the residual stream is)."""
    _, layer = make_layer(*shape)
    randomize_adapter(layer)
    w, p = layer.dense_weight(), layer.projection
    b = layer.B.detach().clone().requires_grad_()
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(2))
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    if capture:
        layer.start_capture()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        low = F.linear(F.linear(x_ref, p), b) if layer.p_is_a else F.linear(F.linear(x_ref, b), p)
        expected = F.linear(x_ref, w) + 0.5 * low
        got = layer(x_got)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    (expected.float() * weights).sum().backward()
    (got.float() * weights).sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    assert x_got.grad.dtype == torch.float32 and layer.B.grad.dtype == torch.float32
    assert torch.allclose(got.float(), expected.float(), **tol)
    assert torch.allclose(x_got.grad, x_ref.grad, **tol)
    assert torch.allclose(layer.B.grad, b.grad, **tol)
    if capture:  # W's gradient, which no parameter holds, reached the layer
        dense = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reference = F.linear(x, dense)
        (reference.float() * weights).sum().backward()
        assert torch.allclose(layer.take_gradient(), dense.grad, **tol)


def test_rank_is_capped_by_the_layer():
    _, layer = make_layer(16, 40, rank=64)
    assert layer.rank == 16 and layer.B.shape == (16, 40)


@pytest.mark.parametrize("iters", [0, 5])
def test_merge_changes_outputs_by_at_most_the_quantization_error(iters):
    _, layer = make_layer(96, 64)
    layer.update(None, torch.randn(96, 64), iters)  # the step-0 refresh: P from a gradient, W quantized
    with torch.no_grad():
        layer.B.normal_(std=0.1)  # as if trained since: a low-rank part well above NF4's error
    before, w_before, delta = effective_weight(layer), layer.dense_weight(), layer.delta()
    x = torch.randn(32, 64)
    y_before = x @ before.T
    new_b = layer.update(None, None, iters)
    with torch.no_grad():
        layer.B.copy_(new_b)
    after = effective_weight(layer)
    quant_err = torch.linalg.matrix_norm(before - NF4Tensor(before).dequantize())
    # The low-rank part moved into W (a merge that did nothing would leave W and B as they were) ...
    moved = torch.linalg.matrix_norm(layer.dense_weight() - w_before)
    assert moved > 0.5 * torch.linalg.matrix_norm(delta) > 2 * quant_err
    assert iters > 0 or not new_b.any()  # without compensation B restarts from zero
    # ... and the layer computes what it did, up to NF4's error.
    assert torch.linalg.matrix_norm(after - before) <= quant_err * (1 + 1e-5)
    assert torch.linalg.matrix_norm(x @ after.T - y_before) <= torch.linalg.matrix_norm(x) * quant_err * (
        1 + 1e-5
    )


def test_no_quantization_merge_is_exact():
    _, layer = make_layer(64, 96, quantize=False)
    randomize_adapter(layer)
    before = effective_weight(layer)
    with torch.no_grad():
        layer.B.copy_(layer.update(None, None, 5))
    assert torch.allclose(effective_weight(layer), before, atol=1e-6)
    assert not layer.B.any()


def largest_principal_angle(a, b):
    """Between the column spaces of a and b (orthonormalised)."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.acos(cos.min().item())


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_projection_spans_a_planted_rank_r_gradient(shape):
    _, layer = make_layer(*shape, rank=8)
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(shape[0], 8, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], 8, generator=g))[0]
    grad = u @ torch.diag(torch.linspace(10, 1, 8)) @ v.T
    layer.update(None, grad, 0)
    if layer.p_is_a:
        assert largest_principal_angle(layer.projection.T, v) < 1e-4
    else:
        assert largest_principal_angle(layer.projection, u) < 1e-4


def test_captured_gradient_equals_autograd_over_micro_batches():
    linear, layer = make_layer(64, 96)
    dense = nn.Linear(96, 64, bias=False)
    dense.weight.data.copy_(layer.dense_weight())
    layer.start_capture()
    for seed in range(3):  # three micro-batches accumulate
        x = torch.randn(4, 7, 96, generator=torch.Generator().manual_seed(seed))
        layer(x).square().sum().backward()
        dense(x).square().sum().backward()
    grad = layer.take_gradient()
    assert torch.allclose(grad, dense.weight.grad, rtol=1e-4, atol=1e-5)
    assert layer.grad_buffer is None and not layer.capture  # freed after the refresh takes it


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_layerwise_capture_gives_the_exact_projection_without_a_dense_buffer(shape):
    """One micro-batch: the P taken inside backward (after the rank reduction) is the P the exact
    capture's SVD gives, and no gradient buffer is kept."""
    _, exact = make_layer(*shape)
    _, layerwise = make_layer(*shape)
    x = torch.randn(4, 7, shape[1], generator=torch.Generator().manual_seed(0))
    reduced = []
    exact.start_capture()
    layerwise.start_capture("layerwise", reduce=lambda g: reduced.append(g.shape) or g)
    exact(x).square().sum().backward()
    layerwise(x).square().sum().backward()
    assert layerwise.grad_buffer is None and reduced == [shape]  # reduced once, as a whole gradient
    expected = exact.projection_from(exact.take_gradient())
    got = layerwise.take_projection()
    assert got.shape == exact.projection_shape and not layerwise.capture
    assert torch.allclose(got.abs(), expected.abs(), atol=1e-5)  # singular vectors up to sign
    assert (
        largest_principal_angle(got if exact.p_is_a else got.T, expected if exact.p_is_a else expected.T)
        < 1e-4
    )


BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: a rounding errs by at most this, relatively


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_an_offloaded_capture_gives_the_summed_gradients_subspace_within_bf16s_bound(shape):
    """Four micro-batches summed in a bf16 host buffer against the exact fp32 sum. Each of the
    four roundings errs by at most u = 2^-8 of the value, so ‖E‖_F <= 4u‖Σ|G_t|‖_F; by Wedin's
    theorem the top-r subspaces then differ by sin θ <= ‖E‖ / (σ_r − σ_{r+1} − ‖E‖). The
    gradient has a planted rank-8 part, so that gap is wide and the bound says something."""
    out_f, in_f = shape
    _, exact = make_layer(out_f, in_f)
    _, offload = make_layer(out_f, in_f)
    gen = torch.Generator().manual_seed(3)
    u, v = (torch.linalg.qr(torch.randn(n, 8, generator=gen))[0] for n in (out_f, in_f))
    batches = []
    for _ in range(4):
        a = torch.randn(32, 8, generator=gen)
        x = 3 * a @ v.T + 0.1 * torch.randn(32, in_f, generator=gen)
        g = a @ u.T + 0.05 * torch.randn(32, out_f, generator=gen)
        batches.append((x, g))
    exact.start_capture("exact")
    offload.start_capture("offload")
    for layer in (exact, offload):
        for x, g in batches:
            layer(x).backward(g)
    summed, rounded = exact.take_gradient(), offload.take_gradient()
    assert offload.host_buffer is None and rounded.dtype == torch.float32

    error_bound = 4 * BF16_UNIT_ROUNDOFF * sum(abs(g.T @ x) for x, g in batches).norm() * 1.01
    assert (rounded - summed).norm() <= error_bound
    sigma = torch.linalg.svdvals(summed)
    gap = float(sigma[7] - sigma[8]) - float(error_bound)
    bound = math.asin(min(1.0, float(error_bound) / gap))
    assert bound < 0.1  # a bound that says something (the angle could be up to pi/2)
    p, reference = offload.projection_from(rounded), exact.projection_from(summed)
    pair = (p.T, reference.T) if exact.p_is_a else (p, reference)
    assert largest_principal_angle(*pair) <= bound


def test_a_non_finite_layerwise_gradient_stops_in_backward_before_the_merge():
    _, layer = make_layer(64, 96)
    layer.start_capture("layerwise", reduce=lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(FloatingPointError, match="refresh gradient is not finite"):
        layer(torch.randn(3, 96)).sum().backward()
    assert layer.take_projection() is None
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())  # nothing merged


def test_evaluation_never_captures_or_merges():
    _, layer = make_layer(64, 96)
    randomize_adapter(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.start_capture()
    x = torch.randn(2, 96, requires_grad=True)
    layer.eval()
    layer(x).sum().backward()
    layer.train()
    with torch.no_grad():
        layer(x)
    assert not layer.grad_buffer.any()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


def compensation_error(iters, quantize_projection=False):
    linear, layer = make_layer(128, 256, rank=16, quantize_projection=quantize_projection)
    w_fp = linear.weight.detach()
    grad = torch.randn(128, 256, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        layer.B.copy_(layer.update(None, grad, iters))
    return torch.linalg.matrix_norm(w_fp - effective_weight(layer)).item()


@pytest.mark.parametrize("shape", [(8, 64), (64, 8)])
def test_the_pseudo_inverse_is_torchs_on_the_cpu(shape):
    from loqt_ray.loqt import pseudo_inverse

    a = torch.randn(*shape)
    a[0] = 0  # a rank-deficient P: the cutoff drops its zero singular value as pinv does
    assert torch.equal(pseudo_inverse(a), torch.linalg.pinv(a))


def test_error_compensation_lowers_the_approximation_error():
    plain, compensated = compensation_error(0), compensation_error(5)
    assert compensated < 0.95 * plain
    assert compensation_error(5, quantize_projection=True) < plain


def _nf4_roundtrip(w):
    return NF4Tensor(w, block_size=64, double_quant=False).dequantize()


def _compensation_case():
    """A Gaussian W (NF4's design distribution) with P on W's top-8 right singular directions, as
    a refresh from a gradient aligned with W gives. Compensation has room here: each iteration
    moves the quantized target inside span P, and the next quantization's residual shrinks."""
    from loqt_ray.loqt import top_right_singular_vectors

    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    return w, top_right_singular_vectors(w, 8)


def _reconstruction_error(w, p, iters, s=0.5):
    from loqt_ray.loqt import compensate

    target, b = compensate(w, p, s, iters, True, _nf4_roundtrip)
    return float(torch.linalg.matrix_norm(w - (_nf4_roundtrip(target) + s * b @ p)))


def test_compensation_iterations_never_lose_and_five_beat_one_on_real_nf4():
    """‖W_fp − (deq Q + s·B·P)‖ over 0-6 iterations: non-increasing, and 5 strictly below 1."""
    w, p = _compensation_case()
    errors = [_reconstruction_error(w, p, iters) for iters in range(7)]
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[5] < 0.95 * errors[1] < errors[0], errors


def _independent_nf4_roundtrip(w):
    """deq(NF4(w)) written out: bitsandbytes' quantization, then its code book and block scales by
    hand (two 4-bit codes a byte, high nibble first)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes = torch.stack((packed.reshape(-1) >> 4, packed.reshape(-1) & 15), dim=1).reshape(-1).long()
    return (state.code[codes].view(-1, 64) * state.absmax.view(-1, 1)).reshape(w.shape)


def test_compensation_iterations_are_quantize_fit_the_residual_and_move_the_target_away_from_it():
    """Two iterations written out here: Q = NF4(T), R = W − deq(Q), B = R·P⁺ / s, starting from
    T = W, the next T = W − s·B·P; compensation keeps the better (Q, B), here the second."""
    from loqt_ray.loqt import compensate

    w, p = _compensation_case()
    s, target, found = 0.5, w, []
    for _ in range(2):
        residual = w - _independent_nf4_roundtrip(target)
        b = residual @ torch.linalg.pinv(p) / s
        found.append((float(torch.linalg.matrix_norm(residual - s * b @ p)), target, b))
        target = w - s * b @ p
    (first, _, b1), (second, t2, b2) = found
    assert second < first  # the moved target quantizes closer
    target, b = compensate(w, p, s, 1, True, _nf4_roundtrip)
    assert torch.equal(target, w) and torch.allclose(b, b1, atol=1e-6)
    target, b = compensate(w, p, s, 2, True, _nf4_roundtrip)
    assert torch.allclose(target, t2, atol=1e-7) and torch.allclose(b, b2, atol=1e-6)
    assert _reconstruction_error(w, p, 2) == pytest.approx(second, rel=1e-5)


def test_schedules():
    assert update_steps(600, "exponential", 100, 1.2) == [0, 100, 201, 302, 403, 505]
    assert update_steps(500, "static", 100) == [0, 100, 200, 300, 400]
    assert update_steps(1000, "linear", 100, increment=50) == [0, 100, 250, 450, 700]
    steps = update_steps(10_000, "exponential", 100, 1.2)
    assert 1000 < steps[-1] - steps[-2] < 1200  # gaps reach about 1.1k by step 10k
    capped = update_steps(40_000, "exponential", 100, 1.2, max_gap=2500)
    assert max(b - a for a, b in itertools.pairwise(capped)) == 2500
    s = UpdateSchedule(LoQTConfig(schedule="static", update_interval=10, refresh_interval=30), 100)
    assert [t for t in range(100) if s.is_update(t)] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert [t for t in range(100) if s.is_refresh(t)] == [0, 30, 60, 90]


def test_apply_loqt_trainable_parameters_follow_the_formula():
    model = apply_loqt(build_model("tiny", 2048), LoQTConfig(rank=16))
    assert len(loqt_layers(model)) == 4 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".B") or "embed" in n or "norm" in n or "lm_head" in n for n in trainable)
    h, i, v, r = 128, 352, 2048, 16
    per_layer = 4 * h * r + 3 * i * r + 2 * h  # B factors (max side x r) and the two norms
    formula = 4 * per_layer + 2 * v * h + h
    assert (
        sum(p.numel() for p in model.parameters() if p.requires_grad)
        == formula
        == expected_trainable_parameters(model)
    )


def test_state_dict_round_trip_gives_identical_outputs():
    a = apply_loqt(build_model("nano", 512, seed=1), LoQTConfig(rank=8, quantize_projection=True))
    for _, layer in loqt_layers(a):
        with torch.no_grad():
            layer.B.copy_(layer.update(None, torch.randn(layer.out_features, layer.in_features), 2))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = apply_loqt(build_model("nano", 512, seed=2), LoQTConfig(rank=8, quantize_projection=True))
    b.load_state_dict(torch.load(buf, weights_only=True))
    ids = torch.randint(0, 512, (2, 16))
    a.eval(), b.eval()
    assert torch.equal(a(ids).logits, b(ids).logits)
    b.to(torch.bfloat16)  # moving/casting keeps the NF4 statistics in their own dtypes
    q = loqt_layers(b)[0][1].weight_q
    assert q.packed.dtype == torch.uint8 and q.code.dtype == torch.float32


@pytest.mark.parametrize("block_size", NF4_BLOCK_SIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_block_sizes(block_size, double_quant):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q = NF4Tensor(w, block_size, double_quant)
    rel = (torch.linalg.matrix_norm(w - q.dequantize()) / torch.linalg.matrix_norm(w)).item()
    assert 0.05 < rel < 0.13
    again = NF4Tensor(torch.zeros_like(w), block_size, double_quant)
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.dequantize(), q.dequantize())


def test_under_autocast_w_is_dequantized_straight_into_the_compute_dtype():
    """No dense fp32 copy of W on any path: the residual stream is fp32 under autocast, and a
    dequantization to x.dtype would make one per layer per forward and backward."""
    _, layer = make_layer(64, 96)
    randomize_adapter(layer)
    dequantized = []
    original = layer.dense_weight
    layer.dense_weight = lambda dtype=torch.float32: dequantized.append(dtype) or original(dtype)
    layer.start_capture()
    x = torch.randn(4, 96, requires_grad=True)  # fp32, as the residual stream is
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert dequantized == [torch.bfloat16, torch.bfloat16]  # forward, backward
    assert x.grad.dtype == torch.float32 and layer.take_gradient().any()
