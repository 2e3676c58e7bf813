"""The Engine protocol's promises, checked on the real DeepSpeed engine in this process (1 rank)."""

import pytest
import torch
from conftest import nano_config

from loqt_ray.trainer import Trainer

pytestmark = pytest.mark.slow  # DeepSpeed's engine (and, on a fresh machine, its CPU op build)


def test_a_merge_through_deepspeed_reaches_its_fp32_master_copy(data_dir):
    from deepspeed.utils import safe_get_full_fp32_param

    from loqt_ray.distributed import DeepSpeedEngine

    cfg = nano_config(
        data_dir, "loqt.update_interval=2", "optim.lr=1e-2", "optim.warmup_steps=1", "train.steps=3",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.eval_tokens=512", "scale.zero_stage=2",
    )  # fmt: skip
    trainer = Trainer(cfg, make_engine=DeepSpeedEngine)
    final = trainer.train()  # merges at steps 0 and 2: it ends right after one
    assert final["updates"] == 2 and final["grad_norm"] > 0
    for layer in trainer.layers:
        master = safe_get_full_fp32_param(layer.B)
        # The optimizer steps the master copy: a merge that only reached the forward copy would
        # leave the stepped pre-merge B there, and the next step would undo the merge.
        assert torch.equal(master, layer.B.detach().float())
    assert any(layer.B.abs().sum() > 0 for layer in trainer.layers)  # compensation's B, not zeros
    trainable = sum(p.numel() for p in trainer.engine.params)
    assert final["master_bytes"] == 4 * trainable  # ZeRO's fp32 partition (all of it on one rank)
