"""LLaMA models of the registry's sizes (config.MODEL_SIZES), built with transformers.

Models are transformers' LlamaForCausalLM, randomly initialised from a
LlamaConfig, or loaded from a local Hugging Face directory to continue training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .config import MODEL_SIZES


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


def build_model(
    size: str, vocab_size: int, max_position_embeddings: int = 1024, seed: int = 0, path: str | None = None
) -> LlamaForCausalLM:
    """A random-init model of a registry size, or the model saved in a local directory."""
    if path is not None:
        return LlamaForCausalLM.from_pretrained(Path(path), torch_dtype=torch.float32, local_files_only=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size, vocab_size, max_position_embeddings))
