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

from . import checkpoint, rundir
from .config import Config, ConfigError, load_config, make_config
from .loqt import LoQTLinear, apply_loqt, loqt_layers
from .models import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_trained(source: str | Path) -> tuple[Config, nn.Module, object]:
    """The run's config, its model with the checkpoint's values (matched by parameter name), and
    its tokenizer. The config is the run directory's config.yaml, or a bare checkpoint's own."""
    from .data import load_tokenizer, prepare

    state_path = checkpoint.find(source)
    state = checkpoint.read(state_path)
    candidates = (state_path.parent / rundir.CONFIG_FILE, state_path.parent.parent / rundir.CONFIG_FILE)
    config_path = next((path for path in candidates if path.is_file()), None)
    if config_path is not None:
        cfg, where = load_config(config_path), str(config_path)
    elif "config" in state:
        cfg, where = make_config(state["config"]), f"{state_path}'s own config"
    else:
        raise ConfigError(str(state_path), "no config.yaml in its run directory to rebuild the model from")
    saved = (config_path or state_path).parent / rundir.TOKENIZER_DIR  # sweep trials rebuild theirs
    tokenizer = load_tokenizer(saved) if saved.is_dir() else prepare(cfg.data).tokenizer
    model = apply_loqt(
        build_model(cfg.model.size, len(tokenizer), cfg.model.max_position_embeddings, path=cfg.model.path),
        cfg.settled_loqt(),
    )
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    try:
        state = checkpoint.upgrade(state, list(named))
        checkpoint.load_buffers(model, state["buffers"])
        values = state["params"]
        if set(values) != set(named) or any(values[n].shape != p.shape for n, p in named.items()):
            raise ValueError("its trainable values have other names or shapes")
    except ValueError as exc:
        raise ConfigError(
            str(state_path),
            f"does not fit the model of {where} ({cfg.model.size}, "
            f"loqt {cfg.loqt.method} rank {cfg.loqt.rank}): {exc}",
        ) from None
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(values[name])
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
