"""The tiny-model training recipe the CPU benches share, so that their numbers compare.

A tiny LLaMA on the embedded corpus, sequences of 128 in micro-batches of 16, lr 3e-3 with 10 %
warmup, LoQT rank 32 with merges from tau = 30 growing by psi = 1.5, one evaluation at the end.
`write_result` is how every in-process bench saves its JSON.
"""

import json
import platform
from pathlib import Path


def tiny_recipe(steps: int, data_dir: str = "data", size: str = "tiny", rank: int = 32) -> list[str]:
    return [
        f"model.size={size}", "data.seq_len=128", f"data.data_dir={data_dir}", f"train.steps={steps}",
        "train.micro_batch_size=16", f"train.eval_every={steps}", f"train.log_every={steps}",
        "train.eval_tokens=65536", "optim.lr=3e-3", f"optim.warmup_steps={steps // 10}", f"loqt.rank={rank}",
        "loqt.update_interval=30", "loqt.psi=1.5",
    ]  # fmt: skip


def write_result(out: str | Path, result: dict) -> None:
    """`result` plus the machine it ran on, as JSON at `out` (bench/results/...)."""
    import torch

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**result, "machine": machine}, indent=1))
