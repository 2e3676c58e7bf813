"""LoQT against full-rank training and its own ablations, on the same tokens.

Trains the same LLaMA (same seed, same data order, same learning-rate schedule)
with full-rank AdamW, LoQT, LoQT-nq (no quantization), LoQT without error
compensation, LoQT with a static schedule, and GaLore (PyPI galore-torch, if
installed), then prints one table and writes bench/results/loqt.json.

    .venv/bin/python bench/bench_loqt.py [--steps 300] [--size tiny]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from recipe import tiny_recipe, write_result

from loqt_ray.config import load_config
from loqt_ray.engine import PlainEngine, held_bytes, optimizer_tensors
from loqt_ray.trainer import Trainer

VARIANTS = {
    "full-rank AdamW": ["loqt.method=full"],
    "LoQT": ["loqt.method=loqt"],
    "LoQT-nq": ["loqt.method=loqt-nq"],
    "LoQT, no compensation": ["loqt.method=loqt", "loqt.compensation_iters=0"],
    "LoQT, static schedule": ["loqt.method=loqt", "loqt.schedule=static"],
    "GaLore": ["loqt.method=full"],
}


class GaLoreEngine(PlainEngine):
    """GaLore's AdamW with projected states on the attention and MLP matrices; its rank and
    projection gap are loqt.rank and loqt.update_interval, its scale loqt.lora_alpha."""

    def __init__(self, model: torch.nn.Module, cfg):
        from galore_torch import GaLoreAdamW

        super().__init__(model, cfg)  # its AdamW holds no state until a step: replacing it costs nothing
        loqt = cfg.loqt
        targets = {
            id(m.weight)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in loqt.targets
        }
        low_rank = [p for p in self.params if id(p) in targets]
        rest = [p for p in self.params if id(p) not in targets]
        groups = [
            {"params": rest},
            {
                "params": low_rank,
                "rank": loqt.rank,
                "update_proj_gap": loqt.update_interval,
                "scale": cfg.lora_scale(),  # the same knob as LoQT's s
                "proj_type": "std",
            },
        ]
        self.optimizer = GaLoreAdamW(groups, lr=cfg.peak_lr(), weight_decay=cfg.optim.weight_decay)

    def state_bytes(self) -> dict:
        # GaLore keeps each projection matrix inside a projector object in the state
        states = [v for state in self.optimizer.state.values() for v in state.values()]
        projections = [v.ortho_matrix for v in states if torch.is_tensor(getattr(v, "ortho_matrix", None))]
        return held_bytes(self.model, self.params, optimizer_tensors([self.optimizer]) + projections)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="bench/results/loqt.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    base = [*tiny_recipe(args.steps, size=args.size, rank=args.rank), "loqt.lora_alpha=0.5", *args.overrides]
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        print("galore-torch not installed (pip install galore-torch): skipping GaLore", file=sys.stderr)
        VARIANTS.pop("GaLore")
    rows = []
    for name, overrides in VARIANTS.items():
        cfg = load_config(None, base + overrides)
        start = time.perf_counter()
        final = Trainer(cfg, make_engine=GaLoreEngine if name == "GaLore" else PlainEngine).train()
        final.update(variant=name, wall_s=time.perf_counter() - start)
        rows.append(final)
        print(
            f"{name}: val ppl {final['val_ppl']:.2f}, {final['tokens_per_s']:.0f} tokens/s", file=sys.stderr
        )
    ref = rows[0]
    table = [
        "| variant | val ppl | ppl / full | tokens/s / full | merge+refresh share | model-state MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        state = (r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]) / 2**20
        table.append(
            f"| {r['variant']} | {r['val_ppl']:.2f} | {r['val_ppl'] / ref['val_ppl']:.3f} | "
            f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {100 * r.get('update_time_share', 0):.1f} % | "
            f"{state:.2f} |"
        )
    print("\n".join(table))
    write_result(args.out, {"settings": base, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
