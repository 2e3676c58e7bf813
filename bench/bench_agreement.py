"""What keeping the ranks in agreement after each merge costs: checksum against broadcast.

The same 2-worker run (Ray Train, DeepSpeed ZeRO-2, gloo on CPU) once per `scale.rank_agreement`
mode; each reports the seconds its agreement step took over all merges (`agree_time_s`), next to
the merges' own time and the step time. Writes bench/results/agreement.json.

    .venv/bin/python bench/bench_agreement.py [--model small] [--steps 24]
"""

from __future__ import annotations

import argparse
import tempfile

from recipe import write_result

from loqt_ray.config import MODEL_SIZES, load_config
from loqt_ray.launch import run_training
from loqt_ray.memory import nf4_bytes


def layer_bytes(cfg) -> int:
    """What a broadcast of every wrapped layer moves from rank 0: NF4 W and P with their quant state,
    and B in fp32."""
    total = 0
    for out_f, in_f in MODEL_SIZES[cfg.model.size].linear_shapes():
        small = min(out_f, in_f)
        rank = min(cfg.loqt.rank, small)
        total += nf4_bytes(out_f * in_f, cfg.loqt.quant_block_size, cfg.loqt.double_quant)
        total += nf4_bytes(rank * small, cfg.loqt.quant_block_size, cfg.loqt.double_quant)
        total += 4 * rank * max(out_f, in_f)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="bench/results/agreement.json")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="bench-agree-")
    runs = {}
    for how in ("checksum", "broadcast"):
        cfg = load_config(
            None,
            [
                f"model.size={args.model}", "data.seq_len=128", "loqt.rank=32", "loqt.update_interval=2",
                "loqt.schedule=static", "optim.warmup_steps=2", f"train.steps={args.steps}",
                f"train.eval_every={args.steps}", "train.micro_batch_size=4", "train.eval_tokens=4096",
                f"train.output_dir={out}", f"train.name={how}", "scale.num_workers=2",
                "scale.cpus_per_worker=1", f"scale.rank_agreement={how}",
            ],
        )  # fmt: skip
        final = run_training(cfg, progress=False)
        merges = final["updates"]
        step_s = final["tokens"] / final["tokens_per_s"] / final["step"]
        runs[how] = {
            "merges": merges,
            "agree_ms_per_merge": 1e3 * final["agree_time_s"] / merges,
            "merge_ms": 1e3 * final["update_time_share"] * step_s * final["step"] / merges,
            "step_ms": 1e3 * step_s,
            "repairs": final["rank_repairs"],
            "val_ppl": final["val_ppl"],
        }
    table = [
        "| mode | merges | agreement ms / merge | merge ms (agreement excluded) | step ms | "
        "agreement / step time | layers repaired |",
        "|---|---|---|---|---|---|---|",
    ]
    for how, r in runs.items():
        share = r["agree_ms_per_merge"] * r["merges"] / (r["step_ms"] * args.steps)
        table.append(
            f"| {how} | {r['merges']} | {r['agree_ms_per_merge']:.1f} | {r['merge_ms']:.1f} | "
            f"{r['step_ms']:.0f} | {share:.2%} | {r['repairs']} |"
        )
    moved = layer_bytes(cfg)
    print("\n".join(table))
    print(f"a broadcast moves {moved / 2**20:.1f} MiB per merge from rank 0 ({args.model}, rank 32)")
    write_result(
        args.out,
        {"model": args.model, "steps": args.steps, "runs": runs, "broadcast_bytes": moved, "table": table},
    )


if __name__ == "__main__":
    main()
