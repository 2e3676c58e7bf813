"""train.cuda_graphs: the loss's forward and backward recorded once as CUDA graphs and replayed.

Why: a small model's LoQT step on a GPU waits on the host (each wrapped layer launches about
twenty small kernels; docs/gpu.md has the measurements). A replay launches the recorded
kernels without Python or per-kernel launch cost.

What is recorded: `model(ids, labels).loss` with its backward, through
torch.cuda.make_graphed_callables. The replay hands the gradients of the trainable parameters
back to autograd, so everything after them (the engine's backward, DeepSpeed's reduction hooks,
the optimizer step, the merges) stays eager and unchanged. Merges rewrite W, P and B in place,
so the recording, whose kernels read that same memory, stays valid across them.

Conditions, each for a reason:
- One micro-batch per step (config.py enforces it): a replay returns the recording's own
  gradient buffers, so a second micro-batch accumulated into them would be overwritten
  (pytorch/pytorch#181723).
- A refresh's gradient pass stays eager: its backward hands dYᵀX to Python
  (LoQTLinear.capture_gradient). It is a pass of its own, before the refresh step's replayed
  one (Trainer._merge). Steps whose batch has another shape than the recorded one run eagerly.
- One stream for everything, the recording's: autograd gives each parameter's gradient
  accumulator the stream it was made on and keeps it; a recording that meets one made on the
  default stream fails ("operation would make the legacy stream depend on a capturing blocking
  stream", torch 2.11; pytorch/pytorch#137483). The trainer calls `use_capture_stream`
  before it builds anything, so every kernel of the run goes to the stream recordings use.
- Recorded after some eager steps: DeepSpeed moves parameters into flat buffers and makes
  optimizer state lazily; the recording must see the addresses training keeps.
- Checked once: the replay's loss and gradients against the eager ones on the recorded batch.
  If recording fails or they differ, the run says why and goes on eagerly: this is a speed
  option, never a reason for a run to stop or to train on wrong gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 2  # eager steps before the recording
LOSS_TOLERANCE = 1e-3  # relative; the replay runs the recorded kernels on the same values
GRAD_TOLERANCE = 2e-2  # relative norm of the difference; bf16 backward kernels may reduce in any order


def use_capture_stream() -> None:
    """Make this thread's current stream the one CUDA graph recordings use (see the module's
    docstring). Constructing a torch.cuda.graph context, without entering it, creates that stream."""
    torch.cuda.set_stream(torch.cuda.graph(torch.cuda.CUDAGraph()).capture_stream)


def record_cuda_graphs(module: torch.nn.Module, args: tuple) -> Callable:
    """torch.cuda.make_graphed_callables, with torch's own remedy for a stale stream switched on
    while it records where torch has it (from pytorch/pytorch#180090; torch 2.11 lacks it):
    any gradient accumulator still on another stream is moved to the recording's."""
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", lambda enabled: None)
    override(True)
    try:
        return torch.cuda.make_graphed_callables(module, args, allow_unused_input=True)
    finally:
        override(False)


def relative_gap(grads: tuple, reference: tuple) -> float:
    """‖grads − reference‖ / ‖reference‖ over all tensors together (None: no gradient, zero)."""
    diffs, norms = [], []
    for g, ref in zip(grads, reference, strict=True):
        if g is None and ref is None:
            continue
        g = torch.zeros_like(ref) if g is None else g
        ref = torch.zeros_like(g) if ref is None else ref
        diffs.append((g.float() - ref.float()).pow(2).sum())
        norms.append(ref.float().pow(2).sum())
    if not diffs:
        return 0.0
    return float((torch.stack(diffs).sum() / torch.stack(norms).sum().clamp_min(1e-30)).sqrt())


class LossOf(torch.nn.Module):
    """model(ids, labels).loss as a module of tensors to a tensor, which is what a recording takes.
    Autocast runs inside it with its cast cache off, which recordings require."""

    def __init__(self, model: torch.nn.Module, autocast: bool):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = ids.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            return self.model(input_ids=ids, labels=labels).loss


class StepGraphs:
    """The recorded loss of one worker's model, and when to use it.

    `say` tells the user whether the recording is in use (or why not). `record(module,
    sample_args)` makes the replaying callable: torch's CUDA graphs by default; tests on the CPU
    give it one that returns the module itself."""

    def __init__(
        self,
        model: torch.nn.Module,
        autocast: bool,
        say: Callable[[str], None],
        record: Callable = record_cuda_graphs,
    ):
        self.module, self.say, self.record = LossOf(model, autocast), say, record
        self.graphed: Callable | None = None
        self.shape: torch.Size | None = None
        self.eager_steps_left = WARMUP_STEPS
        self.off_reason: str | None = None  # set when recording failed or did not match eager
        self.failure: Exception | None = None  # what recording raised, traceback and all
        self.replays = 0

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """This step's loss from the recording (made first, when due), or None: run eagerly."""
        if self.off_reason is not None:
            return None
        if self.graphed is None:
            if self.eager_steps_left > 0:
                self.eager_steps_left -= 1
                return None
            self._record(ids, labels)
            if self.graphed is None:
                return None
        if ids.shape != self.shape:
            return None
        self.replays += 1
        return self.graphed(ids, labels)

    def _record(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        sample = (ids.clone(), labels.clone())  # the recording's own inputs: replays copy into them
        try:
            graphed = self.record(self.module, sample)
            self._check(graphed, ids, labels)
        except Exception as exc:  # noqa: BLE001 - any failure means: train eagerly, and say why
            self.failure = exc
            self.off_reason = f"recording failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        if self.off_reason is not None:
            self.say(f"train.cuda_graphs: {self.off_reason}; training on eagerly")
            return
        self.graphed, self.shape = graphed, ids.shape
        self.say("train.cuda_graphs: the step's forward and backward are recorded; every step replays them")

    def _check(self, graphed: Callable, ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Loss and gradients of one batch, replayed against eager (autograd.grad: nothing is
        accumulated into .grad, so no engine hook sees this). The replay goes first: its gradients
        are the recording's buffers, so the check holds one extra set of gradients, the eager one."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        results = []
        for fn in (graphed, self.module):
            loss = fn(ids, labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((loss.detach().float(), grads))
        (loss_r, grads_r), (loss_e, grads_e) = results
        loss_gap = float((loss_r - loss_e).abs() / loss_e.abs().clamp_min(1e-12))
        grad_gap = relative_gap(grads_r, grads_e)
        if loss_gap > LOSS_TOLERANCE or grad_gap > GRAD_TOLERANCE:
            self.off_reason = (
                f"the replay disagreed with eager training: loss {float(loss_r):.6g} vs {float(loss_e):.6g}, "
                f"gradients {grad_gap:.2%} apart (tolerance {GRAD_TOLERANCE:.0%})"
            )
