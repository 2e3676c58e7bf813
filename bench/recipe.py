"""The tiny-model training recipe the CPU benches share, so that their numbers compare.

A tiny LLaMA on the embedded corpus, sequences of 128 in micro-batches of 16, lr 3e-3 with 10 %
warmup, LoQT rank 32 with merges from tau = 30 growing by psi = 1.5, one evaluation at the end.
`write_result` is how every in-process bench saves its JSON.
"""

import json
import platform
import subprocess
import time
from pathlib import Path


def tiny_recipe(steps: int, data_dir: str = "data", size: str = "tiny", rank: int = 32) -> list[str]:
    return [
        f"model.size={size}", "data.seq_len=128", f"data.data_dir={data_dir}", f"train.steps={steps}",
        "train.micro_batch_size=16", f"train.eval_every={steps}", f"train.log_every={steps}",
        "train.eval_tokens=65536", "optim.lr=3e-3", f"optim.warmup_steps={steps // 10}", f"loqt.rank={rank}",
        "loqt.update_interval=30", "loqt.psi=1.5",
    ]  # fmt: skip


def write_result(out: str | Path, result: dict) -> None:
    """`result` plus what it was measured on (the machine, the commit, the date), as JSON at `out`
    (bench/results/...), so that a figure quoted from it can say so."""
    import torch

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    where = {"machine": machine, "commit": commit(), "date": time.strftime("%Y-%m-%d")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**result, **where}, indent=1))


def commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    run = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    head = run("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")
