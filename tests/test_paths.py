"""Every configurable single-process path trains, checkpoints, resumes and exports (plain engine,
no Ray). The DeepSpeed and multi-worker paths are in test_engines.py and test_distributed.py."""

import pytest
import torch
from conftest import nano_config, train_in_process
from transformers import AutoModelForCausalLM

from loqt_ray import checkpoint
from loqt_ray.engine import PlainEngine
from loqt_ray.export_hf import export_hf
from loqt_ray.rundir import read_metrics
from loqt_ray.sink import Collect
from loqt_ray.trainer import Trainer

PATHS = {
    "loqt, P in NF4, AdamW": [],
    "loqt, dense P": ["loqt.quantize_projection=false"],
    "loqt-nq": ["loqt.method=loqt-nq"],
    "full": ["loqt.method=full"],
    "8-bit Adam": ["optim.name=adam8bit", "scale.zero_stage=0"],
    "per-layer AdamW": ["optim.per_layer=true"],
    "per-layer 8-bit Adam, 16-bit": [
        "optim.per_layer=true", "optim.name=adam8bit", "train.dtype=bfloat16", "train.master_weights=false",
    ],
    "per-layer AdamW, accumulation, activation checkpointing, offload refresh": [
        "optim.per_layer=true", "train.grad_accum=3", "train.activation_checkpointing=true",
        "loqt.refresh=offload",
    ],
    "accumulation, exact refresh": ["train.grad_accum=2", "loqt.refresh=exact"],
    "full, matrices at a quarter of the lr": ["loqt.method=full", "optim.matrix_lr_ratio=0.25"],
}  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_each_path_resumes_exactly_and_exports(path, data_dir, tmp_path):
    cfg = nano_config(
        data_dir, "loqt.update_interval=3", "train.steps=8", "train.checkpoint_every=4", "train.log_every=1",
        "train.eval_every=8", "train.micro_batch_size=4", "optim.lr=1e-2", f"train.output_dir={tmp_path}",
        *PATHS[path],
    )  # fmt: skip
    run, final = train_in_process(cfg)
    straight = {row["step"]: row["train_loss"] for row in read_metrics(run)}

    resumed, rows = Trainer(cfg, make_engine=PlainEngine), []
    resumed.resume(checkpoint.read(run / "checkpoint_000004" / checkpoint.STATE_FILE))
    assert resumed.step == 4
    resumed.train(Collect(rows))
    assert [row["step"] for row in rows] == [5, 6, 7, 8]
    assert all(abs(row["train_loss"] - straight[row["step"]]) < 1e-6 for row in rows), (rows, straight)
    assert straight[8] < straight[1]  # it learns

    # The export (from the straight run's last checkpoint) computes what the resumed model computes.
    model = AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf"))
    ids = resumed.stream.next_batch()[0]
    resumed.model.eval()
    with torch.no_grad():
        expected = resumed.model(input_ids=ids).logits.float()
        got = model(input_ids=ids).logits
    tolerance = 0.05 if cfg.train.dtype == "bfloat16" else 1e-4  # bf16 trainable values
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    assert final["val_ppl"] < 2048
