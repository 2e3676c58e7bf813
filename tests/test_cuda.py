"""The CUDA path against the CPU one. Skipped without a GPU; bench/gpu_check.sh runs them there."""

import copy
import math

import pytest
import torch
from conftest import nano_config
from torch import nn

from loqt_ray import LoQTLinear, checkpoint
from loqt_ray.engine import PlainEngine
from loqt_ray.quant import NF4Tensor
from loqt_ray.sink import Collect

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_nf4_quantized_on_cuda_matches_the_cpu_within_quantization_error():
    w = torch.randn(256, 512) * 0.02
    on_gpu, on_cpu = NF4Tensor(w.cuda()), NF4Tensor(w)
    assert on_gpu.packed.is_cuda
    error = (on_cpu.dequantize() - w).abs().max()
    assert (on_gpu.dequantize().cpu() - on_cpu.dequantize()).abs().max() <= error
    moved = copy.deepcopy(on_cpu).to("cuda")  # Module.to moves in place: keep the CPU one
    assert moved.packed.is_cuda and torch.equal(moved.packed.cpu(), on_cpu.packed)
    assert torch.allclose(moved.dequantize().cpu(), on_cpu.dequantize(), atol=1e-6)


@pytest.mark.parametrize("tokens, bound", [(16, 16), (16, None), (None, None)])
def test_a_refresh_takes_the_same_subspace_on_cuda_from_a_rank_deficient_gradient(tokens, bound):
    """A step that saw fewer tokens than the rank gives a gradient of rank <= tokens (7B's default
    job: 512 tokens, rank 1024), where gesvda failed on an H200; eigh (taken at once when the
    tokens are known, else where gesvda fails) must give what the CPU's SVD gives, and an
    orthonormal P of the full rank."""
    from loqt_ray.loqt import top_right_singular_vectors

    gen = torch.Generator().manual_seed(0)
    k = tokens or 128
    grad = (torch.randn(300, k, generator=gen) / torch.arange(1, k + 1)) @ torch.randn(k, 128, generator=gen)
    rank = 32
    on_cpu = top_right_singular_vectors(grad, rank)
    on_gpu = top_right_singular_vectors(grad.cuda(), rank, bound).cpu()
    assert on_gpu.shape == (rank, 128)
    assert torch.allclose(on_gpu @ on_gpu.T, torch.eye(rank), atol=1e-4)
    compared = min(rank, k)  # past the gradient's rank no vector is preferred
    kept = (on_gpu[:compared] @ on_cpu[:compared].T).pow(2).sum() / compared
    assert kept > 0.999, kept


def test_loqt_linear_forward_backward_merge_refresh_on_cuda_equals_the_cpu():
    torch.manual_seed(0)
    linear = nn.Linear(256, 192, bias=False)
    cpu = LoQTLinear(linear, 16, lora_alpha=0.5, quantize_projection=True)
    gpu = copy.deepcopy(cpu).to("cuda")
    x = torch.randn(4, 32, 256)
    outputs, grads = [], []
    for layer, device in ((cpu, "cpu"), (gpu, "cuda")):
        layer.start_capture()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x.to(device))
        y.float().pow(2).mean().backward()
        outputs.append(y.float().cpu())
        grads.append(layer.B.grad.float().cpu())
        with torch.no_grad():
            layer.B.copy_(layer.update(None, layer.take_gradient(), 5))  # merge, refresh P, recompensate
    assert torch.allclose(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)  # bf16 compute
    assert torch.allclose(grads[0], grads[1], rtol=5e-2, atol=1e-3)
    # The refresh found the same subspace from the two bf16 gradients...
    p_cpu, p_gpu = (layer.projection_matrix().cpu() for layer in (cpu, gpu))
    if not cpu.p_is_a:  # P is out x r: its columns span the subspace
        p_cpu, p_gpu = p_cpu.T, p_gpu.T
    assert (p_gpu @ p_cpu.T).pow(2).sum() / cpu.rank > 0.9  # NF4-stored P: not exactly orthonormal
    # ...and both merges represent W as well as NF4 plus compensation can (elementwise they may
    # round a value into neighbouring NF4 bins: a P that differs in bf16 noise moves the target).
    w = linear.weight.detach()
    errors = [
        (layer.dense_weight().cpu() + layer.delta().cpu() - w).norm() / w.norm() for layer in (cpu, gpu)
    ]
    assert errors[1] < 1.1 * errors[0] + 1e-3 and errors[0] < 0.1, errors


def test_a_checkpoint_saved_on_the_gpu_loads_on_the_cpu(data_dir, tmp_path):
    from loqt_ray.models import build_device
    from loqt_ray.trainer import Trainer

    def cfg(use_gpu):
        return nano_config(data_dir, "train.steps=4", "loqt.update_interval=2", f"scale.use_gpu={use_gpu}")

    gpu = Trainer(cfg(True), make_engine=PlainEngine)
    assert gpu.device.type == "cuda"
    assert build_device("nano", 2048, gpu.device).type == "cuda"  # built there: room for a nano model
    for _ in range(2):
        gpu.train_step()
    checkpoint.write(tmp_path / "c", gpu.checkpointer.state(gpu.step, gpu.counters))
    cpu = Trainer(cfg(False), make_engine=PlainEngine)
    cpu.resume(checkpoint.read(tmp_path / "c" / checkpoint.STATE_FILE))
    assert cpu.step == 2
    for (name, a), b in zip(gpu.model.state_dict().items(), cpu.model.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), name
    gpu.train_step()  # and both go on
    cpu.train_step()


def test_a_step_without_a_merge_never_makes_the_host_wait_for_the_gpu(data_dir):
    """Two micro-batches and AdamW's step with no host sync (torch's sync debug mode raises at
    any): a GPU step that the host sets the pace of (60m LoQT on an H200) loses whatever the
    host waits. An H200 profile found two a micro-batch, the copies of ids and labels. (Not
    8-bit Adam: bitsandbytes synchronizes after every tensor it steps.)"""
    from loqt_ray.trainer import Trainer

    cfg = nano_config(
        data_dir, "loqt.update_interval=4", "train.grad_accum=2", "train.steps=8", "train.dtype=bfloat16",
        "scale.use_gpu=true",
    )  # fmt: skip
    trainer = Trainer(cfg, make_engine=PlainEngine)
    for _ in range(2):  # step 0's merge and refresh, then a step that makes the optimizer state
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.step == 3 and math.isfinite(trainer.train_metrics()["train_loss"])


@pytest.mark.parametrize("method", ["loqt", "full"])
def test_a_cuda_graphs_run_replays_its_steps_and_trains_as_the_eager_run(data_dir, method):
    """train.cuda_graphs through the DeepSpeed engine: the recording is made and passes its own
    check against eager, every step without a refresh after the first two eager ones replays,
    and the losses follow the eager run's (bf16 kernels may reduce in another order)."""
    from loqt_ray.distributed import DeepSpeedEngine
    from loqt_ray.trainer import Trainer

    losses = {}
    for graphs in (False, True):
        cfg = nano_config(
            data_dir, f"loqt.method={method}", "loqt.update_interval=3", "loqt.refresh_interval=6",
            "train.steps=10", "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=10",
            "train.dtype=bfloat16", "scale.use_gpu=true", f"train.cuda_graphs={graphs}",
        )  # fmt: skip
        trainer, rows = Trainer(cfg, make_engine=DeepSpeedEngine), []
        trainer.train(Collect(rows))
        losses[graphs] = [row["train_loss"] for row in rows]
    assert trainer.graphs.off_reason is None, trainer.graphs.failure or trainer.graphs.off_reason
    assert trainer.graphs.replays == (6 if method == "loqt" else 8)  # LoQT refreshes at steps 0 and 6
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
