"""`loqt-ray export-hf RUN_OR_CHECKPOINT OUT_DIR`: a plain Hugging Face LlamaForCausalLM.

Every LoQT layer becomes an ordinary bias-free nn.Linear holding deq(W) + s·B·P
(in float32 unless asked otherwise), so the result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and needs neither this package
nor bitsandbytes. The tokenizer the run trained with is saved beside it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import Config, ConfigError, load_config
from .launch import STATE_FILE, latest_checkpoint, load_state
from .loqt import LoQTLinear, apply_loqt, loqt_layers
from .models import build_model
from .trainer import load_buffers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_checkpoint(source: str | Path) -> Path:
    """state.pt of a run directory's latest checkpoint, of a checkpoint directory, or the file itself."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / STATE_FILE).is_file():
        return source / STATE_FILE
    if source.is_dir() and (latest := latest_checkpoint(source)) is not None:
        return latest / STATE_FILE
    raise ConfigError(str(source), f"neither a run directory with checkpoint_*/{STATE_FILE}, a checkpoint "
                      f"directory nor a {STATE_FILE} file")


def load_trained(source: str | Path) -> tuple[Config, nn.Module, object]:
    """The run's config, its model with the checkpoint's values, and its tokenizer."""
    from .data import load_tokenizer, prepare

    state_path = find_checkpoint(source)
    config_path = next((d / "config.yaml" for d in (state_path.parent, state_path.parent.parent)
                        if (d / "config.yaml").is_file()), None)
    if config_path is None:
        raise ConfigError(str(state_path), "no config.yaml in its run directory to rebuild the model from")
    cfg = load_config(config_path)
    state = load_state(state_path)
    if not isinstance(state, dict) or not {"buffers", "engine"} <= set(state):
        raise ConfigError(str(state_path), "not a loqt-ray checkpoint (no buffers/engine entries)")
    saved = config_path.parent / "tokenizer"  # written by `loqt-ray train`; sweep trials rebuild it
    tokenizer = load_tokenizer(saved) if saved.is_dir() else prepare(cfg.data).tokenizer
    model = apply_loqt(build_model(cfg.model.size, len(tokenizer), cfg.model.max_position_embeddings,
                                   path=cfg.model.path), cfg.loqt)
    params = [p for p in model.parameters() if p.requires_grad]
    values = state["engine"].get("params", [])
    try:
        load_buffers(model, state["buffers"])
        if len(values) != len(params) or any(v.shape != p.shape for v, p in zip(values, params)):
            raise ValueError("its trainable values have other shapes")
    except ValueError as exc:
        raise ConfigError(str(state_path), f"does not fit the model in {config_path} ({cfg.model.size}, "
                          f"loqt {cfg.loqt.method} rank {cfg.loqt.rank}): {exc}") from None
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    return cfg, model, tokenizer


@torch.no_grad()
def fold_loqt(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every LoQTLinear by an nn.Linear with weight deq(W) + s·B·P; cast the rest to `dtype`."""
    for name, layer in loqt_layers(model):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
        dense.weight.copy_(layer.dense_weight() + layer.delta())
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, dense)
    assert not any(isinstance(m, LoQTLinear) for m in model.modules())
    return model.to(dtype)


def export_hf(source: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    cfg, model, tokenizer = load_trained(source)
    model = fold_loqt(model, DTYPES[dtype])
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
