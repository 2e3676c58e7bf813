"""The Engine protocol's promises, checked on the real DeepSpeed engine in this process (1 rank)."""

import pytest
import torch
from conftest import nano_config

from loqt_ray.sink import Collect
from loqt_ray.trainer import Trainer

pytestmark = pytest.mark.slow  # DeepSpeed's engine


def test_a_merge_through_deepspeed_reaches_its_fp32_master_copy(data_dir):
    import deepspeed
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
    # ZeRO's bucket holds what there is to reduce, not DeepSpeed's default 5e8 values (0.93 GiB)
    assert trainer.engine.optimizer.reduce_bucket_size == trainable
    # DeepSpeed's CPU backend was not given its shared-memory op (compiled at its start, unused)
    assert deepspeed.comm.comm.cdb.shm_comm_op is None


def test_8bit_adam_at_zero_stage_0_resumes_exactly(data_dir, tmp_path):
    """ZeRO stage 0 (which 8-bit Adam needs): the engine's stage-0 state_dict/load_state_dict."""
    from loqt_ray import checkpoint
    from loqt_ray.distributed import DeepSpeedEngine

    cfg = nano_config(
        data_dir, "loqt.update_interval=2", "optim.name=adam8bit", "scale.zero_stage=0", "optim.lr=1e-2",
        "train.steps=6", "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=6",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.eval_tokens=512",
    )  # fmt: skip
    straight, rows = Trainer(cfg, make_engine=DeepSpeedEngine), []

    def save(state):
        if state["step"] == 3:
            checkpoint.write(tmp_path / "checkpoint_3", state)

    straight.train(Collect(rows, save))
    states = [v for s in straight.engine._base.state.values() for v in s.values() if torch.is_tensor(v)]
    assert any(v.dtype == torch.uint8 for v in states)  # bitsandbytes' 8-bit moments

    resumed, resumed_rows = Trainer(cfg, make_engine=DeepSpeedEngine), []
    resumed.resume(checkpoint.read(tmp_path / "checkpoint_3" / checkpoint.STATE_FILE))
    resumed.train(Collect(resumed_rows))
    expected = {row["step"]: row["train_loss"] for row in rows}
    assert [row["step"] for row in resumed_rows] == [4, 5, 6]
    assert all(abs(row["train_loss"] - expected[row["step"]]) < 1e-6 for row in resumed_rows)
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_stage_0_checkpoint_resumes_under_zero_2(data_dir, tmp_path):
    """Stage 0 writes a torch optimizer state dict, ZeRO per-parameter moments: either loads both."""
    from loqt_ray import checkpoint
    from loqt_ray.distributed import DeepSpeedEngine

    def cfg(stage):
        return nano_config(
            data_dir, "loqt.update_interval=2", f"scale.zero_stage={stage}", "optim.lr=1e-2", "train.steps=6",
            "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=6", "train.micro_batch_size=4",
            "train.eval_tokens=512",
        )  # fmt: skip

    straight, rows = Trainer(cfg(0), make_engine=DeepSpeedEngine), []
    straight.train(
        Collect(rows, lambda state: state["step"] == 3 and checkpoint.write(tmp_path / "c3", state))
    )
    resumed, resumed_rows = Trainer(cfg(2), make_engine=DeepSpeedEngine), []
    resumed.resume(checkpoint.read(tmp_path / "c3" / checkpoint.STATE_FILE))
    resumed.train(Collect(resumed_rows))
    expected = {row["step"]: row["train_loss"] for row in rows}
    assert [row["step"] for row in resumed_rows] == [4, 5, 6]
    assert all(abs(row["train_loss"] - expected[row["step"]]) < 1e-5 for row in resumed_rows)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_activation_checkpointing_under_deepspeed_trains_as_without(data_dir, stage):
    """Each ZeRO stage's gradient hooks see each parameter's gradient once per backward with the
    blocks recomputed; accumulation and an offloaded refresh included."""
    from loqt_ray.distributed import DeepSpeedEngine

    def losses(checkpointing: bool) -> list[float]:
        cfg = nano_config(
            data_dir, f"scale.zero_stage={stage}", "train.grad_accum=2", "loqt.update_interval=2",
            "train.steps=4", "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=4",
            f"train.activation_checkpointing={checkpointing}",
        )  # fmt: skip
        rows = []
        Trainer(cfg, make_engine=DeepSpeedEngine).train(Collect(rows))
        return [row["train_loss"] for row in rows]

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)
