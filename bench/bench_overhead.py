"""The host cost of LoQT's layers against nn.Linear: operators dispatched and CPU time per pass.

On a GPU a small model's LoQT step waits on the host, not on the device (docs/gpu.md), so every
operator a wrapped layer launches, and the Python around it, is what LoQT's tokens/s
loses to full-rank. This bench measures that part on the CPU, at sizes where the arithmetic is
negligible: the aten operators one forward+backward dispatches (each a kernel launch on a GPU;
bitsandbytes' registered ops count as one) and its wall time, for one layer and for a tiny
LLaMA, LoQT against full-rank in the same process. It prints a table and writes
bench/results/overhead.json.

    .venv/bin/python bench/bench_overhead.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from recipe import write_result
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from loqt_ray.config import DEFAULT_LORA_ALPHA, LoQTConfig
from loqt_ray.loqt import LoQTLinear, apply_loqt
from loqt_ray.models import build_model


class CountOps(TorchDispatchMode):
    """Counts the operators that reach the dispatcher, forward and backward: all of them, and those
    that compute (views and transposes only relabel memory; the rest launch a kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def forward_backward(module: nn.Module, x: torch.Tensor, autocast: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    out = out.logits if hasattr(out, "logits") else out
    out.float().sum().backward()


def measure(module: nn.Module, make_input, autocast: bool, repeats: int) -> dict:
    """Operators per pass (counted once) and the process's CPU time per pass, the least of 5 rounds
    (a shared machine's wall clock wanders between runs; one thread's CPU time much less)."""
    for _ in range(10):  # warm-up: first-call caches, the allocator, the CPU's clock
        forward_backward(module, make_input(), autocast)
    with CountOps() as counter:
        forward_backward(module, make_input(), autocast)
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeats):
            forward_backward(module, make_input(), autocast)
        rounds.append((time.process_time() - start) / repeats)
    module.zero_grad(set_to_none=True)
    ops = sum(counter.ops.values())
    return {
        "ops": ops,
        "kernels": ops - counter.views,
        "top_ops": dict(counter.ops.most_common(6)),
        "us": 1e6 * min(rounds),
    }


def layer_rows(repeats: int) -> dict:
    """One 64 x 172 projection on 64 tokens: nn.Linear, then LoQT with the default settings
    (W and P in NF4, double-quantized)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 172, bias=False)
    cfg = LoQTConfig(rank=16)
    layer = LoQTLinear(
        linear,
        cfg.rank,
        DEFAULT_LORA_ALPHA,
        block_size=cfg.quant_block_size,
        double_quant=cfg.double_quant,
        quantize_projection=cfg.quantize_projection,
    )
    layer.update(None, torch.randn(172, 64), compensation_iters=1)  # a real P and W, as after step 0
    make_input = lambda: torch.randn(4, 16, 64, requires_grad=True)  # noqa: E731
    rows = {}
    for autocast in (False, True):
        precision = "bf16 autocast" if autocast else "fp32"
        rows[f"nn.Linear, {precision}"] = measure(linear, make_input, autocast, repeats)
        rows[f"LoQTLinear, {precision}"] = measure(layer, make_input, autocast, repeats)
    return rows


def model_rows(repeats: int) -> dict:
    """A tiny LLaMA (2 layers' worth of wrapped linears per block), 2 x 32 tokens."""
    make_input = lambda: torch.randint(0, 512, (2, 32))  # noqa: E731
    rows = {}
    for method in ("full", "loqt"):
        model = apply_loqt(build_model("tiny", 512), LoQTConfig(method=method, rank=16))
        rows[f"tiny LLaMA, {method}"] = measure(model, make_input, False, max(1, repeats // 20))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="passes per timed round (layer rows)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # host cost, not the BLAS: one thread keeps rounds comparable
    rows = {**layer_rows(args.repeats), **model_rows(args.repeats)}
    pairs = {
        "layer, fp32": ("LoQTLinear, fp32", "nn.Linear, fp32"),
        "layer, bf16 autocast": ("LoQTLinear, bf16 autocast", "nn.Linear, bf16 autocast"),
        "tiny LLaMA": ("tiny LLaMA, loqt", "tiny LLaMA, full"),
    }
    ratios = {
        name: {"kernels": rows[a]["kernels"] / rows[b]["kernels"], "time": rows[a]["us"] / rows[b]["us"]}
        for name, (a, b) in pairs.items()
    }
    print(f"{'forward + backward':<28} {'ops':>6} {'kernels':>8} {'CPU time':>11}")
    for name, row in rows.items():
        print(f"{name:<28} {row['ops']:>6} {row['kernels']:>8} {row['us']:>8.0f} us")
    print("\nLoQT / full-rank:")
    for name, r in ratios.items():
        print(f"  {name:<26} kernels x{r['kernels']:.2f}   CPU time x{r['time']:.2f}")
    write_result("bench/results/overhead.json", {"rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
