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
    size: str,
    vocab_size: int,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    path: str | None = None,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """A random-init model of a registry size, built and initialised on `device` (a seed gives
    different weights on a GPU than on the CPU: their generators differ), or the model saved in
    a local directory (loaded on the CPU)."""
    if path is not None:
        return LlamaForCausalLM.from_pretrained(Path(path), torch_dtype=torch.float32, local_files_only=True)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(llama_config(size, vocab_size, max_position_embeddings))


def enable_activation_checkpointing(model: LlamaForCausalLM) -> None:
    """Recompute each decoder block in backward (transformers' checkpointing, non-reentrant, so the
    custom autograd nodes inside the blocks run their backward once, on the original graph).
    Newer transformers releases call it activation checkpointing; older ones only have the
    gradient_checkpointing_enable name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_device(size: str, vocab_size: int, device: torch.device) -> torch.device:
    """Where to build a model that trains on `device`: that GPU when it has room for the dense fp32
    model with a quarter to spare (random init of a large model takes minutes on CPU cores and
    seconds on a GPU; LoQT then quantizes it layer by layer where it is), else the CPU (a 24 GB
    GPU cannot hold a dense fp32 7B model: its weights come over one layer at a time)."""
    if device.type != "cuda":
        return torch.device("cpu")
    dense = 4 * MODEL_SIZES[size].parameter_count(vocab_size)
    free, _ = torch.cuda.mem_get_info(device)
    return device if free > 1.25 * dense else torch.device("cpu")
