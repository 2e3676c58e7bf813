"""NF4 tensors on bitsandbytes, held as module buffers.

Keeping the packed 4-bit data and every piece of its quant state as buffers of
an nn.Module means `state_dict()`, `load_state_dict()` and `.to(device)` handle
them like any other tensor, and checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import functools

import bitsandbytes.functional as bnbf
import torch
from torch import nn

NESTED_BLOCK_SIZE = 256  # bitsandbytes' block size for double-quantizing the absmax values


def _dequantize_in_torch(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """NF4 dequantization as plain tensor ops: two 4-bit indices per byte (high nibble first) into
    the 16-value code book, times each block's absmax."""
    nibbles = torch.stack((packed.reshape(-1) >> 4, packed.reshape(-1) & 15), dim=1).reshape(-1).long()
    numel = torch.Size(shape).numel()
    values = code[nibbles[:numel]].float()
    padded = torch.nn.functional.pad(values, (0, -numel % block_size)).view(-1, block_size)
    return (padded * absmax.float().view(-1, 1)).reshape(-1)[:numel].view(shape).to(dtype)


@functools.cache
def _use_cpu_kernel(block_size: int, shape: tuple) -> bool:
    """Whether to dequantize through bitsandbytes' native CPU kernel for this block size and shape,
    rather than the plain ops. Its AVX512 kernel is known to be wrong in places (on some AVX512
    CPUs blocks of 512 and 1024 over rows of 256 come out with 0.31 relative error instead of
    0.10), so it is checked against the plain one once per process and shape rather than trusted.
    From 2048 on the plain ops are used unchecked: bitsandbytes itself falls back there on AVX512,
    to a torch.compile'd function of the same arithmetic whose first call in a process took 3 s
    here (14-30 s within the test suite)."""
    if block_size >= 2048:
        return False
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(
        probe, blocksize=block_size, quant_type="nf4", compress_statistics=False
    )
    native = bnbf.dequantize_4bit(packed, state)
    plain = _dequantize_in_torch(
        packed, state.absmax, state.code, tuple(probe.shape), block_size, torch.float32
    )
    return torch.allclose(native, plain, atol=1e-6)


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
        packed, state = bnbf.quantize_4bit(
            weight.detach().float().contiguous(),
            blocksize=self.block_size,
            quant_type="nf4",
            compress_statistics=self.double_quant,
        )
        buffers = {"packed": packed, "absmax": state.absmax, "code": state.code}
        if self.double_quant:
            buffers.update(
                nested_absmax=state.state2.absmax,
                nested_code=state.state2.code,
                offset=state.offset.reshape(()).float(),
            )
        for name, value in buffers.items():
            if name in self._buffers:
                self._buffers[name].copy_(value)
            else:
                self.register_buffer(name, value)

    def copy_(self, other: NF4Tensor) -> None:
        """Take `other`'s value (same shape and settings), buffer by buffer."""
        assert (other.shape, other.block_size, other.double_quant) == (
            self.shape,
            self.block_size,
            self.double_quant,
        )
        for name, value in other._buffers.items():
            self._buffers[name].copy_(value)

    def absmax_values(self) -> torch.Tensor:
        """Each block's absmax in float32 (undoing the double quantization, if any)."""
        if not self.double_quant:
            return self.absmax
        nested = torch.ops.bitsandbytes.dequantize_blockwise(
            self.absmax, self.nested_absmax, self.nested_code, NESTED_BLOCK_SIZE, torch.float32
        )
        return nested.add_(self.offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W in `dtype`. Through bitsandbytes' registered ops rather than bnbf.dequantize_4bit: that
        wrapper builds two QuantStates and validates them on every call, host time that a GPU step,
        which dequantizes every wrapped layer twice, waits on."""
        absmax = self.absmax_values()
        if self.packed.device.type == "cpu" and not _use_cpu_kernel(self.block_size, self.shape):
            return _dequantize_in_torch(self.packed, absmax, self.code, self.shape, self.block_size, dtype)
        return torch.ops.bitsandbytes.dequantize_4bit(
            self.packed, absmax, self.block_size, "nf4", list(self.shape), dtype
        )

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
