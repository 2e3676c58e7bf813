"""Refreshes under gradient accumulation: how close each way of getting the step's gradient comes to
the exact P, what it costs in perplexity, and what it needs at 7B.

1. Train a tiny LoQT model, then take one more step's gradient of every wrapped W over
   --accum micro-batches: summed exactly in fp32 (loqt.refresh: exact), summed in bf16 host
   buffers (offload, the default under accumulation), and, for comparison, one-pass randomized
   sketches of the same sum (Z = Gᵀ·Ω on P's side, k = r and 2r columns; linear in G, so they
   accumulate and all-reduce exactly), computed from the exact sum. Per layer type: the largest
   principal angle between each P and the exact top-r subspace, and the share of the gradient's
   energy inside span P (||G restricted to span P||² / ||G||²).
2. Train the same run from scratch with exact and with offloaded refreshes under accumulation:
   val ppl at equal tokens, wall time, the share spent merging and refreshing.
3. At 7B (rank 1024, jobs/train_7b_24gb.yaml's settings) by the estimator: what a refresh step
   adds on the device and holds in host memory, for each way.

    python bench/bench_refresh.py      # writes bench/results/refresh.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from recipe import tiny_recipe, write_result

from loqt_ray.config import LINEAR_NAMES, MODEL_SIZES, load_config
from loqt_ray.engine import PlainEngine
from loqt_ray.loqt import loqt_layers
from loqt_ray.trainer import Trainer

SKETCHES = {"sketch, k = r": 1, "sketch, k = 2r": 2}


def base(args) -> list[str]:
    return [
        *tiny_recipe(args.steps, args.data_dir),
        f"train.grad_accum={args.accum}",
        "train.micro_batch_size=4",
    ]


def principal_angle(p: torch.Tensor, q: torch.Tensor) -> float:
    """Largest principal angle (radians) between the row spaces of p and q (r x n each)."""
    qp, _ = torch.linalg.qr(p.T.double())
    qq, _ = torch.linalg.qr(q.T.double())
    cosines = torch.linalg.svdvals(qp.T @ qq).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


def captured_energy(grad: torch.Tensor, p: torch.Tensor, p_is_a: bool) -> float:
    """Share of ||G||² inside span P (P's rows span the in side when P = A, else its columns the out side)."""
    g = grad.double()
    basis, _ = torch.linalg.qr((p.T if p_is_a else p).double())
    inside = g @ basis if p_is_a else basis.T @ g
    return float(inside.square().sum() / g.square().sum())


def sketched_projection(layer, grad: torch.Tensor, columns: int, seed: int) -> torch.Tensor:
    """P from a one-pass sketch of G on P's side (Gᵀ·Ω when P = A, else G·Ω): its top-r left
    singular vectors, in P's orientation."""
    gen = torch.Generator().manual_seed(seed)
    g = grad.T if layer.p_is_a else grad  # (P's side) x (the other side)
    k = min(columns, g.shape[1])
    sketch = g @ torch.randn(g.shape[1], k, generator=gen)
    top = torch.linalg.svd(sketch, full_matrices=False)[0][:, : layer.rank]
    return top.T if layer.p_is_a else top


def step_gradients(trainer: Trainer, how: str) -> dict[str, torch.Tensor]:
    """One step's summed gradient of every wrapped W, captured `how`, over the same micro-batches."""
    position = trainer.stream.state_dict()
    for layer in trainer.layers:
        layer.start_capture(how)
    for _ in range(trainer.cfg.train.grad_accum):
        ids, labels = trainer.stream.next_batch()
        (trainer.model(input_ids=ids, labels=labels).loss / trainer.cfg.train.grad_accum).backward()
    trainer.stream.load_state_dict(position)
    trainer.model.zero_grad(set_to_none=True)
    return {name: layer.take_gradient() for name, layer in loqt_layers(trainer.model)}


def compare_on_trained_model(args) -> dict:
    trainer = Trainer(load_config(None, base(args) + ["loqt.refresh=exact"]), make_engine=PlainEngine)
    trainer.train()
    exact = step_gradients(trainer, "exact")
    offload = step_gradients(trainer, "offload")
    layers = dict(loqt_layers(trainer.model))
    rows = {}
    for kind in LINEAR_NAMES:
        names = [n for n in exact if n.endswith(kind)]
        found = defaultdict(lambda: {"angles": [], "energies": []})
        for i, name in enumerate(names):
            layer, grad = layers[name], exact[name]
            reference = layer.projection_from(grad)
            candidates = {
                "exact": reference,
                "offload (bf16 host sums)": layer.projection_from(offload[name]),
            }
            for method, factor in SKETCHES.items():
                candidates[method] = sketched_projection(layer, grad, factor * layer.rank, seed=i)
            for method, p in candidates.items():
                pair = (p, reference) if layer.p_is_a else (p.T, reference.T)
                found[method]["angles"].append(principal_angle(*pair))
                found[method]["energies"].append(captured_energy(grad, p, layer.p_is_a))
        rows[kind] = {
            method: {
                "max_angle_rad": max(r["angles"]),
                "mean_energy": sum(r["energies"]) / len(r["energies"]),
            }
            for method, r in found.items()
        }
    return rows


def train_each(args) -> dict:
    out = {}
    for method in ("exact", "offload"):
        start = time.perf_counter()
        cfg = load_config(None, base(args) + [f"loqt.refresh={method}"])
        final = Trainer(cfg, make_engine=PlainEngine).train()
        out[method] = {
            "val_ppl": final["val_ppl"],
            "update_time_share": final["update_time_share"],
            "tokens": final["tokens"],
            "wall_s": time.perf_counter() - start,
        }
    return out


def at_7b() -> dict:
    """Each way's refresh-step extra on the device and host memory at 7B, by the estimator. A
    sketch is not a loqt.refresh option: it would hold a k x (P's side) fp32 sketch per layer on
    the device to the merge, and no host buffers."""
    from loqt_ray.memory import GIB, host_refresh_bytes, trainer_estimate

    def estimate(*extra: str):
        e = trainer_estimate(load_config("jobs/train_7b_24gb.yaml", list(extra)))
        return {"device_extra_gib": (e.peak - e.steady) / GIB, "host_gib": e.host / GIB}

    rows = {
        "exact": estimate("loqt.refresh=exact"),
        "offload": estimate("loqt.refresh=offload"),
        "layerwise (one micro-batch a step)": estimate("loqt.refresh=layerwise", "train.grad_accum=1"),
    }
    cfg = load_config("jobs/train_7b_24gb.yaml")
    shapes = MODEL_SIZES["7b"].linear_shapes()
    buffers = host_refresh_bytes(cfg, [(min(o, i), max(o, i)) for o, i in shapes]) / GIB
    for method, factor in SKETCHES.items():
        sketch = sum(4.0 * min(o, i) * factor * cfg.loqt.rank for o, i in shapes) / GIB
        rows[method] = {
            "device_extra_gib": rows["offload"]["device_extra_gib"] + sketch,
            "host_gib": rows["offload"]["host_gib"] - buffers,
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="bench/results/refresh.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    angles = compare_on_trained_model(args)
    runs = train_each(args)
    memory = at_7b()
    lines = [
        "| layer | method | largest principal angle to exact P (rad) | gradient energy in span P |",
        "|---|---|---|---|",
    ]
    for kind, row in angles.items():
        for method, r in row.items():
            lines.append(f"| {kind} | {method} | {r['max_angle_rad']:.2e} | {r['mean_energy']:.3f} |")
    lines += ["", "| refresh | val ppl | ppl / exact | wall s | merge+refresh share of wall time |",
              "|---|---|---|---|---|"]  # fmt: skip
    for method, r in runs.items():
        ratio = r["val_ppl"] / runs["exact"]["val_ppl"]
        lines.append(
            f"| {method} | {r['val_ppl']:.2f} | {ratio:.4f} | {r['wall_s']:.0f} | "
            f"{100 * r['update_time_share']:.1f} % |"
        )
    lines += ["", "| at 7B, rank 1024 | refresh-step extra on the device GiB | host memory at step 0 GiB |",
              "|---|---|---|"]  # fmt: skip
    for method, r in memory.items():
        lines.append(f"| {method} | {r['device_extra_gib']:.2f} | {r['host_gib']:.2f} |")
    print("\n".join(lines))
    result = {"settings": base(args), "angles": angles, "runs": runs, "at_7b": memory, "table": lines}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
