"""LLaMA model registry: the paper's sizes plus small CPU sizes.

Models are transformers' LlamaForCausalLM, randomly initialised from a
LlamaConfig, or loaded from a local Hugging Face directory to continue training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .config import LINEAR_NAMES


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int


# The paper's shapes (LoQT Table 1 and the GaLore configs), and small CPU sizes.
MODEL_SIZES: dict[str, ModelShape] = {
    "nano": ModelShape(64, 176, 2, 2),
    "tiny": ModelShape(128, 352, 4, 4),
    "small": ModelShape(256, 688, 6, 4),
    "60m": ModelShape(512, 1376, 8, 8),
    "130m": ModelShape(768, 2048, 12, 12),
    "350m": ModelShape(1024, 2736, 24, 16),
    "1b": ModelShape(2048, 5461, 24, 32),
    "7b": ModelShape(4096, 11008, 32, 32),
    "13b": ModelShape(5120, 13824, 40, 40),
}


def llama_config(size: str, vocab_size: int, max_position_embeddings: int = 1024) -> LlamaConfig:
    shape = MODEL_SIZES[size]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def linear_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """(out, in) of every attention and MLP linear, layer by layer (the matrices LoQT wraps)."""
    h, i = shape.hidden, shape.intermediate
    per_layer = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                 "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return [per_layer[name] for _ in range(shape.layers) for name in LINEAR_NAMES]


def other_tensors(shape: ModelShape, vocab_size: int) -> list[int]:
    """Sizes of every other parameter: untied embedding and lm_head, the final and per-layer norms."""
    return [vocab_size * shape.hidden, vocab_size * shape.hidden, shape.hidden] + [shape.hidden] * (2 * shape.layers)


def parameter_count(size: str, vocab_size: int) -> int:
    s = MODEL_SIZES[size]
    return sum(o * i for o, i in linear_shapes(s)) + sum(other_tensors(s, vocab_size))


def build_model(size: str, vocab_size: int, max_position_embeddings: int = 1024, seed: int = 0,
                path: str | None = None) -> LlamaForCausalLM:
    """A random-init model of a registry size, or the model saved in a local directory."""
    if path is not None:
        return LlamaForCausalLM.from_pretrained(Path(path), torch_dtype=torch.float32, local_files_only=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size, vocab_size, max_position_embeddings))
