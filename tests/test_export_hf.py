import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loqt_ray.cli import main
from loqt_ray.config import load_config
from loqt_ray.data import prepare, val_rows
from loqt_ray.engine import PlainEngine
from loqt_ray.export_hf import load_trained
from loqt_ray.loqt import loqt_layers
from loqt_ray.trainer import evaluate


def test_export_hf_loads_in_transformers_with_the_trainers_val_ppl(trained_run, tmp_path):
    run, final = trained_run
    out = tmp_path / "hf"
    assert main(["export-hf", str(run), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no loqt_ray, no bitsandbytes
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(type(m).__name__ != "LoQTLinear" for m in model.modules())

    cfg = load_config(run / "config.yaml")
    data = prepare(cfg.data)
    nll, count = evaluate(
        model,
        data.val,
        val_rows(data.val, cfg.train.eval_tokens, 0, 1),
        cfg.train.micro_batch_size,
        torch.device("cpu"),
    )
    assert math.exp(nll / count) == pytest.approx(final["val_ppl"], rel=0.01)

    # Each exported weight is deq(W) + s·B·P, and the low-rank part is really there.
    _, trained, _ = load_trained(run)
    name, layer = loqt_layers(trained)[0]
    with torch.no_grad():
        exported = model.get_submodule(name).weight
        assert torch.allclose(exported, layer.dense_weight() + layer.delta(), atol=1e-6)
        assert layer.delta().abs().max() > 1e-4

    text = "The State of the Union is strong."
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == data.tokenizer(text).input_ids

    # A checkpoint directory works as the source too, and bf16 is offered for smaller files.
    checkpoint = sorted(run.glob("checkpoint_*"))[0]
    assert main(["export-hf", str(checkpoint), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_continued_training_starts_from_an_exported_model(trained_run, tmp_path):
    """`model.path` at an export-hf directory: LoQT wraps the loaded weights (W requantized to NF4),
    so training goes on from the trained model's level, not from a fresh init's."""
    from loqt_ray.trainer import Trainer

    run, final = trained_run
    hf = tmp_path / "hf"
    assert main(["export-hf", str(run), str(hf)]) == 0
    sets = [f"model.path={hf}", f"train.output_dir={tmp_path}", "train.name=continued", "train.steps=4",
            "train.eval_every=4"]  # fmt: skip
    cfg = load_config(run / "config.yaml", sets)
    fresh = Trainer(load_config(run / "config.yaml", sets[1:]), make_engine=PlainEngine).evaluate()["val_ppl"]
    trainer = Trainer(cfg, make_engine=PlainEngine)
    start = trainer.evaluate()["val_ppl"]
    assert abs(start - final["val_ppl"]) < 0.25 * (fresh - final["val_ppl"])  # the trained model's level
    assert trainer.train()["val_ppl"] < start  # and it learns on from there
