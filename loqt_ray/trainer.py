"""The per-worker training loop: the same for one process or N data-parallel ranks.

`Trainer` builds a worker's data, model and engine from the config (the engine `loqt-ray
train` runs for it, unless told otherwise); `train_step` runs one optimizer step (a merge on
the schedule's update steps, then the micro-batches and the step); `train` loops, evaluates
and hands results to a `Sink`, so this module imports no Ray.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .checkpoint import Checkpointer
from .config import Config
from .data import IGNORE_INDEX, PackedSplit, SequenceStream, prepare, val_rows
from .engine import Engine, engine_for
from .graphs import StepGraphs, use_capture_stream
from .loqt import apply_loqt, loqt_layers
from .models import build_device, build_model, enable_activation_checkpointing
from .optim import lr_factor
from .schedule import UpdateSchedule
from .sink import Sink


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`. To a GPU through pinned memory, without waiting: a copy from
    pageable memory makes the host wait for every kernel queued before it, twice a micro-batch
    (ids and labels). torch's pinned-memory cache keeps the pinned copy until the transfer is done."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, split: PackedSplit, rows: list[int], micro_batch: int, device: torch.device
) -> tuple[float, int]:
    """Sum of token NLL and token count over `rows` (the caller all-reduces and divides); summed on
    the device in float64 and read once, so the host never waits on a batch."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(rows), micro_batch):
        ids, labels = (to_device(t, device) for t in split.batch(rows[i : i + micro_batch]))
        logits = model(input_ids=ids).logits.float()
        targets = labels[:, 1:]
        flat_logits = logits[:, :-1].flatten(0, 1)
        nll += F.cross_entropy(flat_logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        count += (targets != IGNORE_INDEX).sum()
    model.train(was_training)
    return nll.item(), int(count)


STOP_ADVICE = "the last checkpoint is kept: lower optim.lr or raise optim.warmup_steps and resume"


def stop_if_not_finite(what: str, value: float, step: int) -> None:
    """Raise before a merge or a checkpoint could store the broken state."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is not finite ({value}) at step {step}; {STOP_ADVICE}")


def mean_over_ranks(world_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Averages a tensor over the data-parallel ranks in place: every rank must compute the same P."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        if world_size > 1:
            torch.distributed.all_reduce(tensor)
            tensor /= world_size
        return tensor

    return reduce


def merge_and_refresh(
    layers, engine: Engine, refresh: bool, compensation_iters: int, world_size: int, step: int
):
    """Merge every LoQT layer (and refresh P on refresh steps), one layer at a time so that
    only one gradient buffer is being worked on; B goes back through the engine. B and the
    gradient are identical on every rank here, so every rank takes the same decision."""
    for layer in layers:
        projection = None
        if refresh:
            grad = layer.take_gradient()
            if grad is None:  # layerwise capture: backward already reduced it, checked it, took P
                projection = layer.take_projection()  # None: backward never reached this layer
            else:
                grad = mean_over_ranks(world_size)(grad)
                stop_if_not_finite("the refresh gradient", float(grad.abs().max()), step)
                projection = layer.projection_from(grad)
                del grad
                stop_if_not_finite("the refresh gradient", float(projection.abs().max()), step)
        b = engine.full_precision(layer.B)
        stop_if_not_finite("B", float(b.abs().max()), step)
        engine.set_param(layer.B, layer.update(b, None, compensation_iters, projection=projection))


def _fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """An exact-bits checksum: the int64 sum of every tensor's 32-bit words (bytes where the size is
    not a multiple of 4). Drift between ranks changes values, which changes the sum."""
    total = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for t in tensors:
        flat = t.detach().contiguous().view(-1)
        words = (
            flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 else flat.view(torch.uint8)
        )
        total += words.sum(dtype=torch.int64)
    return total


def _merged_state(layer, engine: Engine) -> list[torch.Tensor]:
    """What a merge leaves on each rank: W (NF4 bytes and quant state, or dense), P, and B's value."""
    return [*layer.buffers(), engine.full_precision(layer.B)]


def _broadcast_layer(layer, engine: Engine) -> None:
    for buffer in layer.buffers():
        torch.distributed.broadcast(buffer, src=0)
    b = engine.full_precision(layer.B).contiguous().clone()
    torch.distributed.broadcast(b, src=0)
    engine.set_param(layer.B, b)


def agree_with_rank_zero(named_layers, engine: Engine, how: str) -> list[str]:
    """After a merge, make every rank hold rank 0's merged state. It is computed on each rank from the
    all-reduced gradient and agrees only while SVD and quantization are bit-identical everywhere
    (different GPUs, drivers or library builds break that). `broadcast` sends every layer;
    `checksum` compares one checksum per layer and sends only the layers that differ, whose names
    it returns. Every rank takes the same path, so the collectives match."""
    if how == "broadcast":
        for _, layer in named_layers:
            _broadcast_layer(layer, engine)
        return []
    local = torch.stack([_fingerprint(_merged_state(layer, engine)) for _, layer in named_layers])
    reference = local.clone()
    torch.distributed.broadcast(reference, src=0)
    differs = (local != reference).to(torch.int64)
    torch.distributed.all_reduce(differs, op=torch.distributed.ReduceOp.MAX)
    repaired = []
    for (name, layer), bad in zip(named_layers, differs.tolist(), strict=True):
        if bad:
            _broadcast_layer(layer, engine)
            repaired.append(name)
    return repaired


def all_reduce_sum(values: list[float], device: torch.device, world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class Trainer:
    """One worker's model, engine and data stream, built from the config."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, make_engine: Callable | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        use_cuda = cfg.scale.use_gpu and torch.cuda.is_available()
        if cfg.scale.use_gpu and not use_cuda:  # a GPU Ray declared (or a CPU-only torch): say so
            print(
                f"rank {rank}: scale.use_gpu is true but torch sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); training on the CPU",
                file=sys.stderr,
            )
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if cfg.train.cuda_graphs and use_cuda:
            use_capture_stream()  # before anything is built (graphs.py says why)
        self.data = prepare(cfg.data)
        vocab = len(self.data.tokenizer)
        model = build_model(
            cfg.model.size,
            vocab,
            cfg.model.max_position_embeddings,
            seed=cfg.train.seed,
            path=cfg.model.path,
            device=build_device(cfg.model.size, vocab, self.device),
        )
        model.config.use_cache = False  # training: no key/value cache is built
        if cfg.train.activation_checkpointing:  # before an engine wraps it; the wrapped layers too
            enable_activation_checkpointing(model)
        self.model = apply_loqt(model, cfg.settled_loqt(), self.device).to(self.device)
        if not cfg.train.master_weights:  # 16-bit mode: NF4 buffers keep their own dtypes (quant.py)
            self.model.to(torch.bfloat16)
        self.model.train()
        self.named_layers = loqt_layers(self.model)
        self.layers = [layer for _, layer in self.named_layers]
        self.schedule = UpdateSchedule(cfg.loqt, cfg.train.steps)
        self.engine: Engine = (make_engine or engine_for(cfg))(self.model, cfg)
        if use_cuda:  # the peak a run logs is training's, not the dense model a GPU build held
            torch.cuda.reset_peak_memory_stats(self.device)
        # bf16 compute with fp32 parameters (the optimizer keeps full-precision values); in the
        # 16-bit mode the parameters are bf16 already and autocast has nothing to do
        autocast = cfg.train.dtype == "bfloat16" and cfg.train.master_weights
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast)
        self.refresh_method = cfg.refresh_method()
        self.graphs = self._step_graphs(autocast) if cfg.train.cuda_graphs else None
        self.stream = SequenceStream(
            self.data.train, cfg.train.micro_batch_size, cfg.train.seed, rank, world_size
        )
        self.eval_rows = val_rows(self.data.val, cfg.train.eval_tokens, rank, world_size)
        self.checkpointer = Checkpointer(cfg, self.model, self.engine, self.stream)
        train = cfg.train
        self.tokens_per_step = train.micro_batch_size * train.grad_accum * world_size * cfg.data.seq_len
        self.step = 0
        self.counters = {"train_time": 0.0, "update_time": 0.0, "updates": 0, "agree_time": 0.0, "repairs": 0}
        self.lr = 0.0
        # Summed on the device and read once per log: no host sync per micro-batch.
        self._loss_sum = torch.zeros((), device=self.device)
        self._steps_summed = 0
        self._grad_norm: torch.Tensor | None = None

    def resume(self, state: dict) -> None:
        self.step, counters = self.checkpointer.restore(state)
        self.counters.update(counters)  # a counter newer than the checkpoint starts at zero

    def train_step(self) -> None:
        """One optimizer step: on the schedule's update steps first a merge (and on refresh steps
        a refresh from this step's gradient), then the micro-batches and the engine's step."""
        start = time.perf_counter()
        train, step = self.cfg.train, self.step
        self.lr = self.cfg.peak_lr() * lr_factor(step, self.cfg)
        self.engine.set_lr(self.lr)
        batches = [self.stream.next_batch() for _ in range(train.grad_accum)]
        if self.layers and self.schedule.is_update(step):
            self._merge(step + 1, batches if self.schedule.is_refresh(step) else None)
        for batch in batches:
            ids, labels = (to_device(t, self.device) for t in batch)
            loss = self._loss(ids, labels) / train.grad_accum
            self.engine.backward(loss)
            self._loss_sum += loss.detach().float()
        self._steps_summed += 1
        self._grad_norm = self.engine.step()
        self.counters["train_time"] += time.perf_counter() - start
        self.step += 1

    def _merge(self, step: int, refresh_batches: list | None) -> None:
        """Merge every layer before optimizer step `step` (1-based), refreshing P from the gradient
        of `refresh_batches` (that step's micro-batches) where given.

        Before the step, so that the step trains B in the new subspace: stepped first, B would
        move in the old one, and at step 0, where P is still zero, not at all (bench_residual.py
        measures the difference). The gradient comes from a pass of its own through
        autograd.grad, which fills no .grad: no engine counts the pass as a micro-batch or
        steps on it, and the step's own backward captures nothing, so CUDA graphs replay it."""
        start, refresh = time.perf_counter(), refresh_batches is not None
        if refresh:
            self._capture_gradient(refresh_batches, step)
        merge_and_refresh(
            self.layers, self.engine, refresh, self.cfg.loqt.compensation_iters, self.world_size, step
        )
        self.counters["update_time"] += time.perf_counter() - start
        self.counters["updates"] += 1
        if self.world_size > 1:
            self._agree(step)

    def _capture_gradient(self, batches: list, step: int) -> None:
        """The gradient of W over `batches`, captured by each layer for its refresh."""
        for layer in self.layers:
            layer.start_capture(self.refresh_method, mean_over_ranks(self.world_size), self.tokens_per_step)
        params = [layer.B for layer in self.layers]
        for ids, labels in batches:
            ids, labels = to_device(ids, self.device), to_device(labels, self.device)
            # forward itself, not the module's __call__: DeepSpeed hooks that to catch every
            # backward through the model's outputs and reduce the gradients at its end, and this
            # pass is no micro-batch
            with self.autocast:
                loss = self.model.forward(input_ids=ids, labels=labels).loss / self.cfg.train.grad_accum
            try:
                torch.autograd.grad(loss, params, allow_unused=True)  # as backward, a layer it never reaches
            except FloatingPointError as exc:  # a layerwise refresh's gradient, checked in backward
                raise FloatingPointError(f"{exc} at step {step}; {STOP_ADVICE}") from None

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's loss, its backward to come: replayed where train.cuda_graphs has a
        recording, else eager (only the loss is kept: the logits go before backward)."""
        if self.graphs is not None:
            loss = self.graphs.loss(ids, labels)
            if loss is not None:
                return loss
        with self.autocast:
            return self.engine.model(input_ids=ids, labels=labels).loss

    def _step_graphs(self, autocast: bool) -> StepGraphs | None:
        def say(message: str) -> None:
            if self.rank == 0:
                print(message, file=sys.stderr, flush=True)

        if self.device.type != "cuda":
            say("train.cuda_graphs: no CUDA device here; training eagerly")
            return None
        return StepGraphs(self.model, autocast, say)

    def _agree(self, step: int) -> None:
        start = time.perf_counter()
        repaired = agree_with_rank_zero(self.named_layers, self.engine, self.cfg.scale.rank_agreement)
        self.counters["agree_time"] += time.perf_counter() - start
        self.counters["repairs"] += len(repaired)
        if repaired and self.rank == 0:
            print(
                f"warning: after the merge of step {step} rank(s) differed from rank 0 in "
                f"{', '.join(repaired)}; rank 0's W, P and B were broadcast to every rank",
                file=sys.stderr,
            )

    def train_metrics(self) -> dict:
        """Metrics since the last call, averaged over steps and ranks (a host sync, and a collective)."""
        mean_loss = self._loss_sum.item() / self._steps_summed
        (loss_total,) = all_reduce_sum([mean_loss], self.device, self.world_size)
        stop_if_not_finite("the train loss", loss_total, self.step)
        self._loss_sum.zero_()
        self._steps_summed = 0
        train_time = max(self.counters["train_time"], 1e-9)
        metrics = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "lr": self.lr,
            "train_loss": loss_total / self.world_size,
            "tokens_per_s": self.step * self.tokens_per_step / train_time,
            "epoch": self.stream.epoch,
            "memory_mb": peak_memory_mb(self.device),
            "updates": self.counters["updates"],
            "update_time_share": self.counters["update_time"] / train_time,
        }
        if self.world_size > 1:  # the rank-agreement check: its time, and layers it had to repair
            metrics["agree_time_s"] = self.counters["agree_time"]
            metrics["rank_repairs"] = self.counters["repairs"]
        if self.graphs is not None:  # steps replayed from the CUDA graphs recording (train.cuda_graphs)
            metrics["graph_replays"] = self.graphs.replays
        if self._grad_norm is not None:
            metrics["grad_norm"] = float(self._grad_norm)  # of the last step, before clipping
        return metrics

    def evaluate(self) -> dict:
        train = self.cfg.train
        with self.autocast:
            nll, count = evaluate(
                self.engine.model, self.data.val, self.eval_rows, train.micro_batch_size, self.device
            )
        nll, count = all_reduce_sum([nll, count], self.device, self.world_size)
        return {"val_loss": nll / count, "val_ppl": math.exp(nll / count)}

    def train(self, sink: Sink | None = None) -> dict:
        """Run to train.stop_at_step (or train.steps), handing results to `sink`; return the last
        metrics with the state bytes."""
        sink = sink or Sink()
        train = self.cfg.train
        stop = train.stop_at_step or train.steps
        metrics: dict = {}
        while self.step < stop:
            start = time.perf_counter()
            self.train_step()
            done = self.step
            sink.step_done(done, time.perf_counter() - start)
            last = done == stop
            checkpoint = last or (train.checkpoint_every and done % train.checkpoint_every == 0)
            evaluation = last or done % train.eval_every == 0
            if not (evaluation or checkpoint or done % train.log_every == 0):
                continue
            metrics = self.train_metrics()
            if evaluation:
                metrics.update(self.evaluate())
            if checkpoint:
                sink.checkpoint(metrics, lambda done=done: self.checkpointer.state(done, self.counters))
            else:
                sink.log(metrics)
        metrics.update(self.engine.state_bytes())
        return metrics
