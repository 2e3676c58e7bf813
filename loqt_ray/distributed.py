"""DeepSpeed ZeRO data parallelism: the engine the trainer drives on every worker.

Only trainable parameters (the B factors, embeddings, norms, lm_head) are given
to DeepSpeed: the frozen uint8 NF4 buffers are not parameters at all, and ZeRO-3
is refused by the config (it cannot partition them). B values computed by a
merge are installed through DeepSpeed's fp32 master copy (safe_set helpers).
Checkpoints hold full (gathered) fp32 values and optimizer states, so they are
plain tensors, load with weights_only=True, and resume on any world size.
"""

from __future__ import annotations

import os
import socket

import torch

from .config import Config
from .engine import (
    held_bytes,
    load_named_optimizer_state,
    named_optimizer_state,
    optimizer_tensors,
    trainable,
)
from .memory import zero_bucket
from .optim import apply_lr, make_optimizer

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(use_gpu: bool) -> str:
    """NCCL for GPU runs where torch has it (gloo lacks some of the collectives ZeRO calls on CUDA
    tensors); gloo otherwise (a CPU-only torch has no NCCL: its workers fall back to the CPU,
    trainer.Trainer says so)."""
    return "nccl" if use_gpu and torch.distributed.is_nccl_available() else "gloo"


def ensure_process_group(cuda: bool) -> None:
    """A one-process group for runs outside Ray (Ray Train sets up its own)."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group(process_group_backend(cuda), rank=0, world_size=1)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce. Its communication backend
    JIT-builds that C++ op when it starts (half a minute of compiling the first time on a
    machine, and a compiler every CPU machine would need), yet only its
    inference all-reduce calls the op: training's collectives go through the torch process group
    either way. deepspeed.comm's build_shm_op skips an op its compatibility table marks off."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}


def deepspeed_config(cfg: Config, use_bf16: bool, trainable: int) -> dict:
    bucket = zero_bucket(trainable)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": cfg.scale.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """engine.Engine over a deepspeed.DeepSpeedEngine."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        import deepspeed

        cuda = next(model.parameters()).is_cuda
        ensure_process_group(cuda)
        skip_shm_comm_build()
        self.cfg = cfg
        self.names, self.params = trainable(model)
        self.name_of = {id(p): name for name, p in zip(self.names, self.params, strict=True)}
        use_bf16 = cfg.train.dtype == "bfloat16" and cuda
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=make_optimizer(self.params, cfg.optim, cfg.peak_lr(), self.names),
            model_parameters=self.params,
            config=deepspeed_config(cfg, use_bf16, sum(p.numel() for p in self.params)),
            dist_init_required=False,
        )
        self.model = self.engine  # forwards go through the engine

    def set_lr(self, lr: float) -> None:
        apply_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides by grad_accum. DeepSpeed counts micro-batches in its own
        # step(): called between micro-batches it only advances that count (the optimizer steps
        # at the accumulation boundary, which step() below reaches).
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> torch.Tensor | None:
        self.engine.step()  # at the boundary: reduce, clip, optimizer step, zero grads
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def full_precision(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        return param.detach().float() if value is None else value.detach().float()

    def set_param(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)  # the master copy the optimizer steps
        with torch.no_grad():
            param.copy_(value)  # and the copy the forward uses

    # -- checkpoint state: full fp32 values, so any world size can load it
    @property
    def _base(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimizer

    @property
    def _zero(self) -> bool:
        return self.cfg.scale.zero_stage > 0

    def _ensure_adam_state(self) -> None:
        """ZeRO links per-parameter views of the optimizer state only after its first step;
        a resume before that creates the (zero) state and links it, as that step would."""
        base = self._base
        for group in base.param_groups:
            for flat in group["params"]:
                if not base.state[flat]:
                    base.state[flat] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(flat),
                        "exp_avg_sq": torch.zeros_like(flat),
                    }
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def state_dict(self) -> dict:
        """Full fp32 values and optimizer states by name (gathered from the ZeRO partitions: a
        collective, on every rank), encoded as the plain engine encodes them."""
        params = {name: self.full_precision(p).cpu() for name, p in zip(self.names, self.params, strict=True)}
        if not self._zero:  # replicated: the torch optimizer steps the parameters themselves
            return {"params": params, "optimizer": named_optimizer_state(self._base, self.name_of)}
        from deepspeed.utils import safe_get_full_optimizer_state

        step = max((int(s["step"]) for s in self._base.state.values() if "step" in s), default=0)
        if step == 0:  # ZeRO makes its states at the first step: none yet
            return {"params": params, "optimizer": {}}
        optimizer = {
            name: {
                "step": torch.tensor(float(step)),
                **{k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in ADAM_STATE_KEYS},
            }
            for name, p in zip(self.names, self.params, strict=True)
        }
        return {"params": params, "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        for name, p in zip(self.names, self.params, strict=True):
            self.set_param(p, state["params"][name].to(p.device))
        if not self._zero:
            load_named_optimizer_state(self._base, self.name_of, state["optimizer"])
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = state["optimizer"]
        if any(set(s) - {"step", *ADAM_STATE_KEYS} for s in saved.values()):
            raise ValueError(
                "this checkpoint's optimizer is not AdamW (8-bit Adam?): resume it at zero_stage 0"
            )
        self._ensure_adam_state()
        for name, p in zip(self.names, self.params, strict=True):
            for key in ADAM_STATE_KEYS:
                if name in saved:
                    safe_set_full_optimizer_state(p, saved[name][key].to(p.device), key)
        step = max((int(s["step"]) for s in saved.values()), default=0)
        for s in self._base.state.values():  # Adam's bias correction counts optimizer steps
            s["step"] = torch.tensor(float(step))

    def state_bytes(self) -> dict:
        return held_bytes(self.engine.module, self.params, optimizer_tensors([self._base]), [self._base])
