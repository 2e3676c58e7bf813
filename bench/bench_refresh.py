"""Refresh methods on real gradients: how close each method's P is to the exact SVD, and what
each costs in perplexity and time.

1. Train a tiny LoQT model (exact refreshes), then take one more batch's gradient of every
   wrapped W twice: once kept dense (exact capture) and once reduced, SVD'd and freed inside
   backward (layerwise). Per layer type: the largest principal angle between each method's P
   and the exact top-r singular subspace of that gradient, and the share of the gradient's
   energy P captures (||G restricted to span P||² / ||G||²).
2. Train the same run with each method from scratch: val ppl at equal tokens, the share of
   wall time spent merging and refreshing.

    python bench/bench_refresh.py      # writes bench/results/refresh.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from recipe import tiny_recipe, write_result

from loqt_ray.config import LINEAR_NAMES, load_config
from loqt_ray.loqt import loqt_layers
from loqt_ray.trainer import Trainer

METHODS = ("exact", "layerwise")


def base(args) -> list[str]:
    return tiny_recipe(args.steps, args.data_dir)


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


def compare_on_trained_model(args) -> dict:
    trainer = Trainer(load_config(None, base(args) + ["loqt.refresh=exact"]))
    trainer.train()
    ids, labels = trainer.stream.next_batch()
    gradients, projections = {}, defaultdict(dict)
    for method in METHODS:
        for layer in trainer.layers:
            layer.start_capture(None if method == "exact" else (lambda g: g))
        trainer.model(input_ids=ids, labels=labels).loss.backward()
        for name, layer in loqt_layers(trainer.model):
            if method == "exact":
                gradients[name] = layer.take_gradient()
                projections[method][name] = layer.projection_from(gradients[name])
            else:
                projections[method][name] = layer.take_projection()
        trainer.model.zero_grad(set_to_none=True)
    layers = dict(loqt_layers(trainer.model))
    rows = {}
    for kind in LINEAR_NAMES:
        names = [n for n in gradients if n.endswith(kind)]
        row = {}
        for method in METHODS:
            angles, energies = [], []
            for name in names:
                layer, p = layers[name], projections[method][name]
                reference = projections["exact"][name]
                pair = (p, reference) if layer.p_is_a else (p.T, reference.T)
                angles.append(principal_angle(*pair))
                energies.append(captured_energy(gradients[name], p, layer.p_is_a))
            row[method] = {"max_angle_rad": max(angles), "mean_energy": sum(energies) / len(energies)}
        rows[kind] = row
    return rows


def train_each(args) -> dict:
    out = {}
    for method in METHODS:
        start = time.perf_counter()
        final = Trainer(load_config(None, base(args) + [f"loqt.refresh={method}"])).train()
        out[method] = {
            "val_ppl": final["val_ppl"],
            "update_time_share": final["update_time_share"],
            "tokens": final["tokens"],
            "wall_s": time.perf_counter() - start,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="bench/results/refresh.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    angles = compare_on_trained_model(args)
    runs = train_each(args)
    lines = [
        "| layer | method | largest principal angle to exact P (rad) | gradient energy in span P |",
        "|---|---|---|---|",
    ]
    for kind, row in angles.items():
        for method, r in row.items():
            lines.append(f"| {kind} | {method} | {r['max_angle_rad']:.2e} | {r['mean_energy']:.3f} |")
    lines += [
        "",
        "| refresh | val ppl | ppl / exact | merge+refresh share of wall time |",
        "|---|---|---|---|",
    ]
    for method, r in runs.items():
        ratio = r["val_ppl"] / runs["exact"]["val_ppl"]
        lines.append(
            f"| {method} | {r['val_ppl']:.2f} | {ratio:.4f} | {100 * r['update_time_share']:.1f} % |"
        )
    print("\n".join(lines))
    write_result(args.out, {"settings": base(args), "angles": angles, "runs": runs, "table": lines})


if __name__ == "__main__":
    main()
