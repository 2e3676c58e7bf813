"""What the order of an update step costs: LoQT's merge and refresh before the step's optimizer
step (as the trainer does it) against after it, each beside GaLore at the same scale.

Merged after the step, an update step trains B first and merges after: at step 0 P is still
zero, so the wrapped matrices get no update that step while Adam's step count advances, and on
every later refresh step B is stepped in the old subspace before the new P replaces it. The
trainer merges before the step instead (Trainer._merge), so its step trains B in the new
subspace, as GaLore projects each step's gradient onto the subspace it has just taken. LoQT and
LoQT-nq in both orders and GaLore run at one lr and scale, two seeds, the quality bench's long
horizon and recipe, in this process; runs the quality bench made already come from its cache.

    .venv/bin/python bench/bench_residual.py [--steps 320] [--scale 0.25] [--lr 0.01]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_quality import ROOT, Runs
from recipe import write_result

from loqt_ray.optim import lr_factor
from loqt_ray.trainer import Trainer, merge_and_refresh, to_device


class MergeAfter(Trainer):
    """A trainer whose update steps run their micro-batches and optimizer step first, capturing
    the refresh gradient in that backward, and merge (and refresh) after it (plain engine, one
    worker)."""

    def train_step(self) -> None:
        step, train = self.step, self.cfg.train
        if not (self.layers and self.schedule.is_update(step)):
            return super().train_step()
        start, refresh = time.perf_counter(), self.schedule.is_refresh(step)
        self.lr = self.cfg.peak_lr() * lr_factor(step, self.cfg)
        self.engine.set_lr(self.lr)
        for layer in self.layers if refresh else ():
            layer.start_capture("exact", None, self.tokens_per_step)
        for _ in range(train.grad_accum):
            ids, labels = (to_device(t, self.device) for t in self.stream.next_batch())
            loss = self._loss(ids, labels) / train.grad_accum
            self.engine.backward(loss)
            self._loss_sum += loss.detach().float()
        self._steps_summed += 1
        self._grad_norm = self.engine.step()
        merge_and_refresh(self.layers, self.engine, refresh, self.cfg.loqt.compensation_iters, 1, step + 1)
        self.counters["updates"] += 1
        self.counters["train_time"] += time.perf_counter() - start
        self.step += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--work", default="runs/bench_quality", help="the quality bench's cache, shared")
    ap.add_argument("--out", default="bench/results/residual.json")
    args = ap.parse_args()
    variants = {
        "GaLore": (Trainer, "galore"),
        "LoQT-nq, merged before the step": (Trainer, "loqt-nq"),
        "LoQT-nq, merged after the step": (MergeAfter, "loqt-nq"),
        "LoQT, merged before the step": (Trainer, "loqt"),
        "LoQT, merged after the step": (MergeAfter, "loqt"),
    }
    Path(args.work).mkdir(parents=True, exist_ok=True)
    runs = Runs(Path(args.work) / "runs.json", args.data_dir)
    at = [f"optim.lr={args.lr}", f"loqt.lora_alpha={args.scale}"]
    rows = {
        name: [runs.val_ppl(method, args.steps, [*at, f"train.seed={seed}"], trainer) for seed in (0, 1)]
        for name, (trainer, method) in variants.items()
    }
    galore = statistics.fmean(rows["GaLore"])
    lines = ["| variant | val ppl (seeds 0, 1) | mean | / GaLore |", "|---|---|---|---|"]
    for name, values in rows.items():
        mean = statistics.fmean(values)
        lines.append(f"| {name} | {values[0]:.2f}, {values[1]:.2f} | {mean:.2f} | {mean / galore:.4f} |")
    print("\n".join(lines))
    write_result(args.out, {"settings": vars(args), "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
