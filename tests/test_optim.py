import dataclasses
import math

import pytest
import torch

from loqt_ray import LoQTConfig, apply_loqt
from loqt_ray.config import DEFAULT_LORA_ALPHA, DEFAULT_LR, OptimConfig, load_config
from loqt_ray.loqt import loqt_layers
from loqt_ray.models import build_model
from loqt_ray.optim import PerLayerOptimizer, lr_factor, make_optimizer


def loqt_model():
    model = apply_loqt(build_model("nano", 256, seed=0), LoQTConfig(rank=4))
    for _, layer in loqt_layers(model):  # a first refresh sets P, so B receives gradients
        with torch.no_grad():
            layer.B.copy_(layer.update(None, torch.randn(layer.out_features, layer.in_features), 1))
    return model


def loss_of(model):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("name", ["adamw", "adam8bit"])
def test_optimizer_steps_trainable_parameters(name):
    model = loqt_model()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(params, OptimConfig(name=name), lr=1e-2)
    loss_of(model).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    if name == "adam8bit":
        states = [s for s in opt.state.values() if "state1" in s]
        assert states and any(s["state1"].dtype == torch.uint8 for s in states)


def test_per_layer_updates_step_inside_backward_and_free_gradients():
    model = loqt_model()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = PerLayerOptimizer(
        params, OptimConfig(grad_clip=1.0), lr=1e-2, names=[str(i) for i in range(len(params))]
    )
    assert len(opt.optimizers) == len(params)
    loss_of(model).backward()
    assert all(p.grad is None for p in params)  # each gradient freed as soon as it was used
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    opt.remove_hooks()


def test_warmup_then_cosine_to_min_ratio():
    cfg = load_config(None, ["train.steps=100", "optim.min_lr_ratio=0.1"])  # warmup: 10 % of the steps
    assert cfg.warmup_steps() == 10
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))
    assert not math.isnan(lr_factor(0, load_config(None, ["train.steps=1", "optim.warmup_steps=0"])))


def test_defaults_follow_the_reference_recipe_per_method_and_the_quality_bench_where_it_measured():
    loqt, full = load_config(None, ["model.size=60m"]), load_config(None, ["loqt.method=full"])
    assert (loqt.peak_lr(), full.peak_lr()) == (DEFAULT_LR["loqt"], DEFAULT_LR["full"])
    assert DEFAULT_LR["loqt"] == 1e-2 and DEFAULT_LR["loqt-nq"] == 1e-2  # the reference scripts' lr
    assert loqt.lora_scale() == DEFAULT_LORA_ALPHA == 0.25 and loqt.loqt.lora_alpha is None
    assert (loqt.optim.grad_clip, loqt.optim.eps, loqt.loqt.quantize_projection) == (0.0, 1e-6, True)
    assert load_config(None, ["optim.lr=3e-4", "loqt.method=full"]).peak_lr() == 3e-4  # set wins
    assert load_config(None, ["train.steps=60000"]).warmup_steps() == 6000

    for method in ("loqt", "loqt-nq"):  # the tiny model (the default size): the bench's tuned best
        tiny = load_config(None, [f"loqt.method={method}"])
        assert (tiny.peak_lr(), tiny.lora_scale()) == (3e-2, 0.125)
        assert tiny.settled_loqt().lora_alpha == 0.125 and tiny.to_dict()["loqt"]["lora_alpha"] is None
    nano = load_config(None, ["model.size=nano"])
    assert (nano.peak_lr(), nano.lora_scale()) == (1e-2, 0.25)  # not measured: the recipe's
    tiny = load_config(None, ["optim.lr=1e-3", "loqt.lora_alpha=0.5"])
    assert (tiny.peak_lr(), tiny.lora_scale()) == (1e-3, 0.5)  # set wins
    local = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, path="/models/llama"))
    local = dataclasses.replace(local, optim=OptimConfig(), loqt=LoQTConfig())
    assert (local.peak_lr(), local.lora_scale()) == (1e-2, 0.25)  # a local model's size field is unused


@pytest.mark.parametrize("method", ["full", "loqt"])
def test_the_matrices_take_their_own_learning_rate_ratio(data_dir, method):
    """optim.matrix_lr_ratio: the attention and MLP matrices' trainable values (full-rank's weights,
    LoQT's B) step at lr x ratio at every step of the schedule, the rest at lr."""
    from conftest import nano_config

    from loqt_ray.engine import PlainEngine
    from loqt_ray.trainer import Trainer

    cfg = nano_config(data_dir, f"loqt.method={method}", "optim.matrix_lr_ratio=0.25", "train.steps=3")
    trainer = Trainer(cfg, make_engine=PlainEngine)
    trainer.train_step()
    groups = {group["lr_ratio"]: group for group in trainer.engine.optimizer.param_groups}
    assert set(groups) == {0.25, 1.0}
    name_of = trainer.engine.name_of
    matrices = {name_of[id(p)].rsplit(".", 2)[-2] for p in groups[0.25]["params"]}
    assert matrices == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(name_of[id(p)].rsplit(".", 2)[-2] not in matrices for p in groups[1.0]["params"])
    assert groups[0.25]["lr"] == pytest.approx(0.25 * trainer.lr) and groups[1.0]["lr"] == trainer.lr
