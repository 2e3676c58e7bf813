import math

import pytest
import torch
from conftest import nano_config

from loqt_ray.config import load_config


def test_full_rank_training_lowers_validation_loss(data_dir):
    from loqt_ray.trainer import train

    cfg = load_config(
        None,
        [
            f"data.data_dir={data_dir}",
            "data.vocab_size=2048",
            "data.seq_len=128",
            "model.size=nano",
            "loqt.method=full",
            "optim.lr=3e-3",
            "optim.warmup_steps=5",
            "train.steps=40",
            "train.micro_batch_size=8",
            "train.eval_every=20",
            "train.eval_tokens=8192",
            "train.log_every=20",
        ],
    )
    reports = []
    final = train(cfg, reports.append)
    evals = [r for r in reports if "val_ppl" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_ppl"] < evals[0]["val_ppl"] < 2048  # better than uniform, and improving
    assert math.isclose(final["val_ppl"], math.exp(final["val_loss"]))
    assert final["tokens"] == 40 * 8 * 128


def test_evaluations_on_merge_steps_change_nothing_in_training(data_dir):
    """An evaluation right after every step, merge and refresh steps included (the reference's
    evaluation on a merge step merged again and dropped the adapter), trains exactly as none."""
    from loqt_ray.trainer import Trainer

    def run(eval_every):
        cfg = nano_config(
            data_dir, "loqt.update_interval=4", "loqt.refresh_interval=8", "train.steps=10",
            "train.micro_batch_size=4", "train.grad_accum=2", "train.log_every=1",
            f"train.eval_every={eval_every}",
        )  # fmt: skip
        trainer, rows = Trainer(cfg), []
        trainer.train(rows.append)
        return trainer, rows

    evaluated, rows = run(1)
    plain, plain_rows = run(10)
    assert all("val_ppl" in row for row in rows)  # right after the merges at steps 0, 4, 8 too
    assert [row["updates"] for row in rows] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert [row["train_loss"] for row in rows] == [row["train_loss"] for row in plain_rows]
    assert rows[-1]["val_ppl"] == plain_rows[-1]["val_ppl"] < rows[0]["val_ppl"]
    for (name, a), b in zip(
        evaluated.model.state_dict().items(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    share = rows[-1]["update_time_share"]
    assert 0 < share < 1 and evaluated.counters["update_time"] > 0


def test_bf16_autocast_loqt_run(data_dir):
    """The GPU recipe (bf16 compute, fp32 master values, 8-bit Adam) runs on CPU too."""
    from loqt_ray.trainer import train

    cfg = nano_config(
        data_dir,
        "loqt.schedule=exponential",
        "optim.warmup_steps=100",
        "data.seq_len=128",
        "loqt.update_interval=5",
        "train.dtype=bfloat16",
        "optim.name=adam8bit",
        "scale.zero_stage=0",
        "optim.lr=1e-2",
        "train.steps=20",
        "train.micro_batch_size=8",
        "train.eval_every=20",
        "train.eval_tokens=2048",
        "train.log_every=20",
    )
    final = train(cfg)
    assert final["updates"] == 4 and final["val_ppl"] < 2048  # merges at 0, 5, 11, 17
    assert final["optimizer_bytes"] > 0


def test_layerwise_and_exact_refreshes_train_the_same_model(data_dir):
    """One micro-batch per step: P taken inside backward equals P from the kept dense gradient."""
    from loqt_ray.trainer import Trainer

    def run(refresh):
        cfg = nano_config(
            data_dir, "loqt.update_interval=3", f"loqt.refresh={refresh}", "train.steps=9",
            "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=9",
        )  # fmt: skip
        trainer, rows = Trainer(cfg), []
        trainer.train(rows.append)
        return trainer, [row["train_loss"] for row in rows]

    exact, exact_losses = run("exact")
    layerwise, layerwise_losses = run("layerwise")
    assert exact.counters["updates"] == layerwise.counters["updates"] == 3  # refreshes at 0, 3, 6
    # each refresh knows how many tokens its gradient sums, which bounds its rank (on CUDA: eigh)
    assert {layer.capture_tokens for layer in exact.layers} == {exact.tokens_per_step} == {4 * 64}
    assert layerwise_losses == pytest.approx(exact_losses, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(exact.model.named_buffers(), layerwise.model.buffers(), strict=True):
        if name.endswith("projection"):
            assert torch.allclose(a.abs(), b.abs(), atol=1e-4), name


def test_16_bit_mode_stores_trainable_values_in_bf16_and_learns(data_dir):
    """The reference's single-GPU 16-bit mode: bf16 parameters, 8-bit Adam stepped per layer."""
    from loqt_ray.trainer import Trainer

    cfg = nano_config(
        data_dir,
        "loqt.schedule=exponential",
        "data.seq_len=128",
        "loqt.update_interval=5",
        "train.dtype=bfloat16",
        "train.master_weights=false",
        "loqt.quantize_projection=false",  # a dense P, to see it stored in bf16 too
        "optim.name=adam8bit",
        "optim.per_layer=true",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "train.steps=20",
        "train.micro_batch_size=8",
        "train.eval_every=10",
        "train.eval_tokens=2048",
        "train.log_every=10",
    )
    trainer, rows = Trainer(cfg), []
    final = trainer.train(rows.append)
    assert {p.dtype for p in trainer.engine.params} == {torch.bfloat16}
    assert (
        trainer.layers[0].weight_q.packed.dtype == torch.uint8
        and trainer.layers[0].projection.dtype == torch.bfloat16
    )
    assert final["updates"] == 4 and rows[1]["val_ppl"] < rows[0]["val_ppl"] < 2048
