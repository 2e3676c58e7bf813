"""NF4 tensors on bitsandbytes, held as module buffers.

Keeping the packed 4-bit data and every piece of its quant state as buffers of
an nn.Module means `state_dict()`, `load_state_dict()` and `.to(device)` handle
them like any other tensor, and checkpoints load with `weights_only=True`.
"""
from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from torch import nn

NESTED_BLOCK_SIZE = 256  # bitsandbytes' block size for double-quantizing the absmax values


class NF4Tensor(nn.Module):
    """A matrix quantized to NF4 (block size `block_size`, optional double quantization)."""

    def __init__(self, weight: torch.Tensor, block_size: int = 64, double_quant: bool = True):
        super().__init__()
        self.shape = tuple(weight.shape)
        self.block_size, self.double_quant = block_size, double_quant
        self.quantize_(weight)

    def quantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored value with NF4(weight); shapes stay the same, so buffers are reused."""
        assert tuple(weight.shape) == self.shape, (weight.shape, self.shape)
        packed, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=self.block_size,
                                           quant_type="nf4", compress_statistics=self.double_quant)
        buffers = {"packed": packed, "absmax": state.absmax, "code": state.code}
        if self.double_quant:
            buffers.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                           offset=state.offset.reshape(()).float())
        for name, value in buffers.items():
            if name in self._buffers:
                self._buffers[name].copy_(value)
            else:
                self.register_buffer(name, value)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        state2 = None
        if self.double_quant:
            state2 = bnbf.QuantState(self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCK_SIZE,
                                     dtype=torch.float32)
        state = bnbf.QuantState(self.absmax, shape=torch.Size(self.shape), code=self.code, blocksize=self.block_size,
                                quant_type="nf4", dtype=dtype, offset=self.offset if self.double_quant else None,
                                state2=state2)
        return bnbf.dequantize_4bit(self.packed, state)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move these buffers but never cast them: the absmax
        # statistics and code books lose their meaning in bf16. A uint8 probe reveals the
        # device fn targets without a dtype change.
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.packed.device)).device
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(device)
        return self

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block_size={self.block_size}, double_quant={self.double_quant}"
