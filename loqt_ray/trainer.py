"""The per-worker training loop: the same for one process or N data-parallel ranks.

It prepares data, builds the model, runs micro-batches with gradient
accumulation, steps the optimizer, and evaluates validation perplexity.
Metrics leave through a `report` callback, so this module imports no Ray.
"""
from __future__ import annotations

import math
import resource
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import Config
from .data import IGNORE_INDEX, PackedSplit, SequenceStream, prepare, val_rows
from .loqt import apply_loqt, loqt_layers
from .models import build_model
from .optim import PerLayerOptimizer, lr_factor, make_optimizer
from .schedule import UpdateSchedule

Report = Callable[[dict], None]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: PackedSplit, rows: list[int], micro_batch: int,
             device: torch.device) -> tuple[float, int]:
    """Sum of token NLL and token count over `rows` (the caller all-reduces and divides)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(rows), micro_batch):
        ids, labels = split.batch(rows[i:i + micro_batch])
        logits = model(input_ids=ids.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return nll, count


class PlainEngine:
    """A torch optimizer (or per-layer optimizers) on one process."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.model, self.cfg = model, cfg  # forwards go through engine.model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self.build_optimizer()

    def build_optimizer(self):
        if self.cfg.optim.per_layer:
            return PerLayerOptimizer(self.params, self.cfg.optim)
        return make_optimizer(self.params, self.cfg.optim)

    def set_lr(self, lr: float) -> None:
        if isinstance(self.optimizer, PerLayerOptimizer):
            self.optimizer.set_lr(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def full_precision(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.detach().float()

    def set_param(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu().clone() for p in self.params], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for p, value in zip(self.params, state["params"]):
            self.set_param(p, value)
        self.optimizer.load_state_dict(state["optimizer"])

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        opts = self.optimizer.optimizers.values() if isinstance(self.optimizer, PerLayerOptimizer) else [self.optimizer]
        return [v for opt in opts for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]

    def state_bytes(self) -> dict:
        """Bytes of weights (parameters and buffers), gradients (one per trainable element, as
        held during a step) and optimizer state (every tensor it keeps)."""
        size = lambda t: t.numel() * t.element_size()
        return {"weight_bytes": sum(size(t) for t in list(self.model.parameters()) + list(self.model.buffers())),
                "grad_bytes": sum(size(p) for p in self.params),
                "optimizer_bytes": sum(size(t) for t in self.optimizer_state_tensors())}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step, zero grads; returns the gradient norm (nan under per-layer updates)."""
        if isinstance(self.optimizer, PerLayerOptimizer):
            return float("nan")  # already stepped inside backward
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def stop_if_not_finite(what: str, value: float, step: int) -> None:
    """Raise before a merge or a checkpoint could store the broken state."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is not finite ({value}) at step {step}; the last checkpoint is kept: "
                                 "lower optim.lr or raise optim.warmup_steps and resume")


def merge_and_refresh(layers, engine, refresh: bool, compensation_iters: int, world_size: int, step: int) -> None:
    """Merge every LoQT layer (and refresh P on refresh steps), one layer at a time so that
    only one gradient buffer is being worked on; B goes back through the engine. B and the
    gradient are identical on every rank here, so every rank takes the same decision."""
    for layer in layers:
        grad = layer.take_gradient() if refresh else None
        if grad is not None and world_size > 1:  # every rank must compute the same P
            torch.distributed.all_reduce(grad)
            grad /= world_size
        b = engine.full_precision(layer.B)
        stop_if_not_finite("B", float(b.abs().max()), step)
        if grad is not None:
            stop_if_not_finite("the refresh gradient", float(grad.abs().max()), step)
        engine.set_param(layer.B, layer.update(b, grad, compensation_iters))


def all_reduce_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def checkpoint_state(model: torch.nn.Module, engine, stream: SequenceStream, step: int, counters: dict) -> dict:
    """All an exact resume needs, as plain tensors and numbers (loads with weights_only=True).

    Checkpoints are taken between optimizer steps, after any merge: no refresh gradient is
    half-accumulated then, and the schedule position is the step itself. The buffers (NF4 W
    with its quant state, P) come from the model; trainable values and optimizer states from
    the engine, which gathers them in full (a collective: every rank calls this)."""
    params = {name for name, _ in model.named_parameters()}
    return {"step": step, "counters": counters, "stream": stream.state_dict(), "rng": torch.get_rng_state(),
            "buffers": {k: v.cpu() for k, v in model.state_dict().items() if k not in params},
            "engine": engine.state_dict()}


def load_buffers(model: torch.nn.Module, buffers: dict) -> None:
    """A checkpoint's buffers (NF4 W with its quant state, P) into `model`; ValueError if they do
    not fit it. Trainable values come separately (through the engine, or copied by export-hf)."""
    params = {name for name, _ in model.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(buffers, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"checkpoint does not fit this model: {str(exc).splitlines()[-1].strip()}") from None
    if unexpected or set(missing) != params:
        raise ValueError(f"checkpoint does not fit this model: missing {sorted(set(missing) - params)[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for layer in (m for _, m in loqt_layers(model)):
        layer.initial_weight = None  # step 0 has run: W already holds its compensated value


def restore(state: dict, model: torch.nn.Module, engine, stream: SequenceStream) -> None:
    load_buffers(model, state["buffers"])
    engine.load_state_dict(state["engine"])
    stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["rng"])


def train(cfg: Config, report: Optional[Report] = None, rank: int = 0, world_size: int = 1,
          make_engine: Callable = PlainEngine, resume: Optional[dict] = None,
          save: Optional[Callable[[dict, dict], None]] = None) -> dict:
    """Train as `cfg` says; return the last metrics (with the final val_ppl and state bytes).

    `resume` is a state from `checkpoint_state`; `save(state, metrics)` is called on every rank
    at checkpoint steps (every train.checkpoint_every steps and at the end, or at stop_at_step)."""
    report = report or (lambda m: None)
    device = torch.device("cuda" if cfg.scale.use_gpu and torch.cuda.is_available() else "cpu")
    data = prepare(cfg.data)
    model = build_model(cfg.model.size, len(data.tokenizer), cfg.model.max_position_embeddings,
                        seed=cfg.train.seed, path=cfg.model.path)
    model = apply_loqt(model, cfg.loqt).to(device)
    model.train()
    layers = [layer for _, layer in loqt_layers(model)]
    schedule = UpdateSchedule(cfg.loqt, cfg.train.steps)
    engine = make_engine(model, cfg)
    # bf16 compute with fp32 parameters: the optimizer keeps full-precision values
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")
    stream = SequenceStream(data.train, cfg.train.micro_batch_size, cfg.train.seed, rank, world_size)
    eval_rows = val_rows(data.val, cfg.train.eval_tokens, rank, world_size)
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.grad_accum * world_size * cfg.data.seq_len
    counters = {"train_time": 0.0, "update_time": 0.0, "updates": 0}
    first_step = 0
    if resume is not None:
        restore(resume, model, engine, stream)
        first_step, counters = resume["step"], dict(resume["counters"])
    metrics: dict = {}
    loss_sum, loss_count = torch.zeros((), device=device), 0  # read once per log: no sync per micro-batch
    stop = t.stop_at_step or t.steps
    for step in range(first_step, stop):
        start = time.perf_counter()
        lr = cfg.optim.lr * lr_factor(step, t.steps, cfg.optim)
        engine.set_lr(lr)
        refresh = bool(layers) and schedule.is_refresh(step)
        if refresh:
            for layer in layers:
                layer.start_capture()
        for _ in range(t.grad_accum):
            ids, labels = stream.next_batch()
            with autocast:
                loss = engine.model(input_ids=ids.to(device), labels=labels.to(device)).loss / t.grad_accum
            engine.backward(loss)
            loss_sum += loss.detach().float()
            loss_count += 1
        engine.step()
        if layers and schedule.is_update(step):
            update_start = time.perf_counter()
            merge_and_refresh(layers, engine, refresh, cfg.loqt.compensation_iters, world_size, step + 1)
            counters["update_time"] += time.perf_counter() - update_start
            counters["updates"] += 1
        counters["train_time"] += time.perf_counter() - start
        done = step + 1
        last = done == stop
        checkpoint = save is not None and (last or (t.checkpoint_every and done % t.checkpoint_every == 0))
        if done % t.log_every == 0 or done % t.eval_every == 0 or last or checkpoint:
            (loss_total,) = all_reduce_sum([loss_sum.item() * t.grad_accum / loss_count], device, world_size)
            stop_if_not_finite("the train loss", loss_total, done)
            metrics = {"step": done, "tokens": done * tokens_per_step, "lr": lr, "train_loss": loss_total / world_size,
                       "tokens_per_s": done * tokens_per_step / max(counters["train_time"], 1e-9),
                       "epoch": stream.epoch, "memory_mb": peak_memory_mb(device), "updates": counters["updates"],
                       "update_time_share": counters["update_time"] / max(counters["train_time"], 1e-9)}
            loss_sum.zero_()
            loss_count = 0
            if done % t.eval_every == 0 or last:
                with autocast:
                    nll, count = evaluate(model, data.val, eval_rows, t.micro_batch_size, device)
                nll, count = all_reduce_sum([nll, count], device, world_size)
                metrics["val_loss"] = nll / count
                metrics["val_ppl"] = math.exp(nll / count)
            if checkpoint:
                save(checkpoint_state(model, engine, stream, done, counters), metrics)
            else:
                report(metrics)
    metrics.update(engine.state_bytes())
    return metrics
