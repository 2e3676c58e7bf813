"""The 16-bit single-GPU mode (bf16 trainable values, no fp32 master) against the fp32-master path.

Both runs: tiny model, bf16 compute, 8-bit Adam stepped per layer, layerwise refreshes, the same
tokens and seed; they differ only in train.master_weights. Reported: val ppl, tokens/s, and the
bytes of weights and optimizer state each holds.

    python bench/bench_precision.py      # writes bench/results/precision.json
"""

from __future__ import annotations

import argparse

from recipe import tiny_recipe, write_result

from loqt_ray.config import load_config
from loqt_ray.trainer import Trainer

VARIANTS = {
    "fp32 master values (autocast bf16)": ["train.master_weights=true"],
    "16-bit: bf16 values, no master copy": ["train.master_weights=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="bench/results/precision.json")
    args = ap.parse_args()
    base = [
        *tiny_recipe(args.steps, args.data_dir),
        "train.dtype=bfloat16",
        "optim.name=adam8bit",
        "optim.per_layer=true",
    ]
    rows = {name: Trainer(load_config(None, base + extra)).train() for name, extra in VARIANTS.items()}
    reference = rows[next(iter(VARIANTS))]
    lines = ["| variant | val ppl | ppl / fp32 master | tokens/s | weights MB | optimizer state MB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['val_ppl']:.2f} | {r['val_ppl'] / reference['val_ppl']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['weight_bytes'] / 2**20:.2f} | "
            f"{r['optimizer_bytes'] / 2**20:.2f} |"
        )
    print("\n".join(lines))
    write_result(args.out, {"settings": base, "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
