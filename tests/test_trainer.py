import math

import pytest
import torch
from conftest import nano_config

from loqt_ray.config import load_config
from loqt_ray.engine import PlainEngine
from loqt_ray.optim import lr_factor
from loqt_ray.sink import Collect
from loqt_ray.trainer import Trainer


def test_full_rank_training_lowers_validation_loss(data_dir):
    from loqt_ray.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"data.data_dir={data_dir}",
            "data.vocab_size=2048",
            "data.seq_len=128",
            "model.size=nano",
            "loqt.method=full",
            "optim.lr=3e-3",
            "optim.warmup_steps=5",
            "train.steps=40",
            "train.micro_batch_size=8",
            "train.eval_every=20",
            "train.eval_tokens=8192",
            "train.log_every=20",
        ],
    )
    reports = []
    final = Trainer(cfg, make_engine=PlainEngine).train(Collect(reports))
    evals = [r for r in reports if "val_ppl" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_ppl"] < evals[0]["val_ppl"] < 2048  # better than uniform, and improving
    assert math.isclose(final["val_ppl"], math.exp(final["val_loss"]))
    assert final["tokens"] == 40 * 8 * 128


def test_evaluations_on_merge_steps_change_nothing_in_training(data_dir):
    """An evaluation right after every step, merge and refresh steps included (the reference's
    evaluation on a merge step merged again and dropped the adapter), trains exactly as none."""
    from loqt_ray.trainer import Trainer

    def run(eval_every):
        cfg = nano_config(
            data_dir, "loqt.update_interval=4", "loqt.refresh_interval=8", "train.steps=10",
            "train.micro_batch_size=4", "train.grad_accum=2", "train.log_every=1",
            f"train.eval_every={eval_every}",
        )  # fmt: skip
        trainer, rows = Trainer(cfg, make_engine=PlainEngine), []
        trainer.train(Collect(rows))
        return trainer, rows

    evaluated, rows = run(1)
    plain, plain_rows = run(10)
    assert all("val_ppl" in row for row in rows)  # right after the merges at steps 0, 4, 8 too
    assert [row["updates"] for row in rows] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert [row["train_loss"] for row in rows] == [row["train_loss"] for row in plain_rows]
    assert rows[-1]["val_ppl"] == plain_rows[-1]["val_ppl"] < rows[0]["val_ppl"]
    for (name, a), b in zip(
        evaluated.model.state_dict().items(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    share = rows[-1]["update_time_share"]
    assert 0 < share < 1 and evaluated.counters["update_time"] > 0


def test_bf16_autocast_loqt_run(data_dir):
    """The GPU recipe (bf16 compute, fp32 master values, 8-bit Adam) runs on CPU too."""
    from loqt_ray.trainer import Trainer

    cfg = nano_config(
        data_dir,
        "loqt.schedule=exponential",
        "optim.warmup_steps=100",
        "data.seq_len=128",
        "loqt.update_interval=5",
        "train.dtype=bfloat16",
        "optim.name=adam8bit",
        "scale.zero_stage=0",
        "optim.lr=1e-2",
        "train.steps=20",
        "train.micro_batch_size=8",
        "train.eval_every=20",
        "train.eval_tokens=2048",
        "train.log_every=20",
    )
    final = Trainer(cfg, make_engine=PlainEngine).train()
    assert final["updates"] == 4 and final["val_ppl"] < 2048  # merges at 0, 5, 11, 17
    assert final["optimizer_bytes"] > 0


def test_layerwise_and_exact_refreshes_train_the_same_model(data_dir):
    """One micro-batch per step: P taken inside backward equals P from the kept dense gradient."""
    from loqt_ray.trainer import Trainer

    def run(refresh):
        cfg = nano_config(
            data_dir, "loqt.update_interval=3", f"loqt.refresh={refresh}", "train.steps=9",
            "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=9",
        )  # fmt: skip
        trainer, rows = Trainer(cfg, make_engine=PlainEngine), []
        trainer.train(Collect(rows))
        return trainer, [row["train_loss"] for row in rows]

    exact, exact_losses = run("exact")
    layerwise, layerwise_losses = run("layerwise")
    assert exact.counters["updates"] == layerwise.counters["updates"] == 3  # refreshes at 0, 3, 6
    # each refresh knows how many tokens its gradient sums, which bounds its rank (on CUDA: eigh)
    assert {layer.capture_tokens for layer in exact.layers} == {exact.tokens_per_step} == {4 * 64}
    assert layerwise_losses == pytest.approx(exact_losses, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(exact.model.named_buffers(), layerwise.model.buffers(), strict=True):
        if name.endswith("projection"):
            assert torch.allclose(a.abs(), b.abs(), atol=1e-4), name


def test_16_bit_mode_stores_trainable_values_in_bf16_and_learns(data_dir):
    """The reference's single-GPU 16-bit mode: bf16 parameters, 8-bit Adam stepped per layer."""
    from loqt_ray.trainer import Trainer

    cfg = nano_config(
        data_dir,
        "loqt.schedule=exponential",
        "data.seq_len=128",
        "loqt.update_interval=5",
        "train.dtype=bfloat16",
        "train.master_weights=false",
        "loqt.quantize_projection=false",  # a dense P, to see it stored in bf16 too
        "optim.name=adam8bit",
        "optim.per_layer=true",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "train.steps=20",
        "train.micro_batch_size=8",
        "train.eval_every=10",
        "train.eval_tokens=2048",
        "train.log_every=10",
    )
    trainer, rows = Trainer(cfg, make_engine=PlainEngine), []
    final = trainer.train(Collect(rows))
    assert {p.dtype for p in trainer.engine.params} == {torch.bfloat16}
    assert (
        trainer.layers[0].weight_q.packed.dtype == torch.uint8
        and trainer.layers[0].projection.dtype == torch.bfloat16
    )
    assert final["updates"] == 4 and rows[1]["val_ppl"] < rows[0]["val_ppl"] < 2048


def _graph_runs(data_dir, record):
    """The same LoQT run trained eagerly and with train.cuda_graphs' StepGraphs installed, whose
    recording is `record` (the CPU has no CUDA graphs: the trainer's logic around them is tested)."""
    from loqt_ray.graphs import StepGraphs
    from loqt_ray.trainer import Trainer

    runs, said = [], []
    for graphs in (False, True):
        cfg = nano_config(
            data_dir, "loqt.update_interval=3", "loqt.refresh_interval=6", "train.steps=10",
            "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=10",
        )  # fmt: skip
        trainer, rows = Trainer(cfg, make_engine=PlainEngine), []
        if graphs:
            trainer.graphs = StepGraphs(trainer.model, False, said.append, record=record)
        trainer.train(Collect(rows))
        runs.append((trainer, rows))
    return runs, said


def test_cuda_graphs_replay_every_step_without_a_refresh_and_train_the_same_model(data_dir):
    """Replays start after two eager steps and take every step after them, refresh steps (0, 6)
    included: a refresh's gradient has an eager pass of its own, before the step. The merges
    (0, 3, 6, 9) and the losses stay as eager training has them. Here the recording is the loss
    module itself, so the two runs must agree exactly."""
    recorded = []

    def record(module, sample):
        recorded.append(sample[0].shape)
        return module

    ((eager, eager_rows), (graphed, rows)), said = _graph_runs(data_dir, record)
    assert recorded == [(4, 64)] and said == [said[0]] and "recorded" in said[0]
    assert graphed.graphs.replays == 10 - 2 and rows[-1]["graph_replays"] == 8
    assert graphed.counters["updates"] == eager.counters["updates"] == 4
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in eager_rows]
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("failure", ["raises", "disagrees", "torch on a CPU"])
def test_a_recording_that_fails_or_disagrees_with_eager_leaves_training_eager(data_dir, failure):
    """Recording is a speed option: a failure, or a replay whose loss or gradients differ from
    eager ones, is reported in one line and the run goes on eagerly, unchanged. The last case is
    torch's own recorder where there is no CUDA device."""
    from loqt_ray.graphs import record_cuda_graphs

    def record(module, sample):
        if failure == "raises":
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        if failure == "torch on a CPU":
            return record_cuda_graphs(module, sample)
        return lambda ids, labels: module(ids, labels) * 1.5

    if failure == "torch on a CPU" and torch.cuda.is_available():
        pytest.skip("records for real where there is a GPU (tests/test_cuda.py)")
    ((eager, eager_rows), (graphed, rows)), said = _graph_runs(data_dir, record)
    expected = {
        "raises": "recording failed: RuntimeError: operation not permitted",
        "disagrees": "the replay disagreed with eager training: loss",
        "torch on a CPU": "recording failed: RuntimeError",
    }[failure]
    assert len(said) == 1 and expected in said[0] and said[0].endswith("training on eagerly"), said
    assert "\n" not in said[0]
    assert graphed.graphs.replays == 0 and graphed.graphs.graphed is None
    assert isinstance(graphed.graphs.failure, RuntimeError) == (failure != "disagrees")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in eager_rows]


def test_cuda_graphs_fall_back_to_eager_for_a_batch_of_another_shape(data_dir):
    from loqt_ray.graphs import StepGraphs
    from loqt_ray.models import build_model

    model = build_model("nano", 2048, 128, seed=0)
    graphs = StepGraphs(model, False, print, record=lambda module, sample: module)
    ids = torch.randint(0, 2048, (2, 16))
    assert [graphs.loss(ids, ids) is None for _ in range(3)] == [True, True, False]  # 2 eager, then recorded
    assert graphs.loss(ids[:, :8], ids[:, :8]) is None and graphs.replays == 1


def test_cuda_graphs_on_a_machine_without_cuda_train_eagerly_and_say_so(data_dir, capsys):
    from loqt_ray.trainer import Trainer

    cfg = nano_config(data_dir, "scale.use_gpu=true", "train.cuda_graphs=true", "train.steps=2")
    trainer = Trainer(cfg, make_engine=PlainEngine)
    trainer.train()
    assert trainer.graphs is None and trainer.step == 2
    assert "train.cuda_graphs: no CUDA device here; training eagerly" in capsys.readouterr().err


def losses_of(cfg) -> tuple:
    from loqt_ray.trainer import Trainer

    trainer, rows = Trainer(cfg, make_engine=PlainEngine), []
    trainer.train(Collect(rows))
    return trainer, [row["train_loss"] for row in rows]


CHECKPOINTED = {
    "loqt, exact refresh, accumulation": ["loqt.refresh=exact", "train.grad_accum=2"],
    "loqt, offload refresh, accumulation": ["loqt.refresh=offload", "train.grad_accum=2"],
    "loqt, layerwise refresh": ["loqt.refresh=layerwise"],
    "full-rank": ["loqt.method=full"],
    "per-layer AdamW, accumulation": ["optim.per_layer=true", "train.grad_accum=2"],
    "16-bit, per-layer 8-bit Adam": [
        "optim.per_layer=true", "optim.name=adam8bit", "train.dtype=bfloat16", "train.master_weights=false",
    ],
}  # fmt: skip


@pytest.mark.parametrize("path", CHECKPOINTED)
def test_activation_checkpointing_recomputes_without_changing_the_losses(data_dir, path):
    """Recomputing each block in backward gives the step the same gradients, refreshes and merges
    included (7 steps, merges at 0, 3, 6): the losses of a run with it equal one without."""

    def run(checkpointing: bool):
        cfg = nano_config(
            data_dir, "loqt.update_interval=3", "train.steps=7", "train.micro_batch_size=4",
            "train.log_every=1", "train.eval_every=7", f"train.activation_checkpointing={checkpointing}",
            *CHECKPOINTED[path],
        )  # fmt: skip
        return losses_of(cfg)

    on, on_losses = run(True)
    off, off_losses = run(False)
    assert on.model.model.gradient_checkpointing and not off.model.model.gradient_checkpointing
    assert on_losses == pytest.approx(off_losses, rel=1e-5, abs=1e-6)
    assert on_losses[-1] < on_losses[0]


@pytest.mark.parametrize("refresh", ["exact", "offload", "layerwise"])
def test_a_recomputed_block_captures_each_layers_gradient_once_per_backward(data_dir, refresh):
    """The recompute runs each block's forward a second time; the gradient capture happens in the
    original nodes' backward, once per micro-batch, never again for the recomputed graph."""
    from loqt_ray.trainer import Trainer

    accum = 1 if refresh == "layerwise" else 3
    cfg = nano_config(
        data_dir, f"loqt.refresh={refresh}", f"train.grad_accum={accum}", "train.micro_batch_size=2",
        "train.activation_checkpointing=true", "train.steps=2",
    )  # fmt: skip
    trainer = Trainer(cfg, make_engine=PlainEngine)
    calls = {}
    for name, layer in trainer.named_layers:
        original = layer.capture_gradient
        layer.capture_gradient = lambda g, x, name=name, original=original: (
            calls.__setitem__(name, calls.get(name, 0) + 1),
            original(g, x),
        )
    trainer.train_step()  # step 0: a refresh
    assert calls == {name: accum for name, _ in trainer.named_layers}


@pytest.mark.parametrize(("name", "tolerance"), [("adamw", 1e-5), ("adam8bit", 1e-4)])
def test_per_layer_updates_under_accumulation_follow_the_plain_optimizer(data_dir, name, tolerance):
    """Four micro-batches a step: each tensor's gradient accumulates over all four and is stepped
    once, in the last one's backward, at the step's lr: the same run as the plain optimizer's."""

    def run(per_layer: bool):
        cfg = nano_config(
            data_dir, f"optim.name={name}", f"optim.per_layer={per_layer}", "train.grad_accum=4",
            "scale.zero_stage=0", "loqt.update_interval=3", "train.steps=7", "train.micro_batch_size=2",
            "train.log_every=1", "train.eval_every=7", "optim.lr=1e-2",
        )  # fmt: skip
        from loqt_ray.trainer import Trainer

        trainer, rows = Trainer(cfg, make_engine=PlainEngine), []
        trainer.train(Collect(rows))
        return trainer, rows

    per_layer, per_layer_rows = run(True)
    plain, plain_rows = run(False)
    assert [r["lr"] for r in per_layer_rows] == [r["lr"] for r in plain_rows]
    assert [r["train_loss"] for r in per_layer_rows] == pytest.approx(
        [r["train_loss"] for r in plain_rows], rel=tolerance
    )
    steps = {int(s["step"]) for opt in per_layer.engine._optimizers for s in opt.state.values()}
    assert steps == {7}  # one optimizer step per step, not one per micro-batch


def test_an_offloaded_refresh_under_accumulation_trains_as_the_exact_one(data_dir):
    """The whole step's gradient summed in bf16 host buffers gives the refreshes exact's subspace:
    the run follows the exact run's losses (bf16 sums move P's weakest directions a little)."""
    _, exact = losses_of(nano_config(
        data_dir, "loqt.refresh=exact", "train.grad_accum=3", "loqt.update_interval=3", "train.steps=9",
        "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=9",
    ))  # fmt: skip
    trainer, offload = losses_of(nano_config(
        data_dir, "loqt.refresh=offload", "train.grad_accum=3", "loqt.update_interval=3", "train.steps=9",
        "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=9",
    ))  # fmt: skip
    assert offload == pytest.approx(exact, rel=2e-3)
    assert all(layer.host_buffer is None and layer.grad_buffer is None for layer in trainer.layers)


@pytest.mark.parametrize(
    "extra",
    [["loqt.refresh=layerwise"], ["loqt.refresh=exact", "train.grad_accum=2"],
     ["loqt.refresh=offload", "train.grad_accum=2"]],
    ids=["layerwise", "exact, accumulation", "offload, accumulation"],
)  # fmt: skip
def test_p_changes_exactly_on_the_schedules_refresh_steps(data_dir, extra):
    """Merges every 2 steps, a refresh every 4: over 10 steps P changes in steps 0, 4 and 8 (before
    each one's optimizer step) and in no other step; W changes at every merge."""
    from loqt_ray.schedule import UpdateSchedule

    cfg = nano_config(
        data_dir, "loqt.update_interval=2", "loqt.refresh_interval=4", "train.steps=10",
        "train.micro_batch_size=2", *extra,
    )  # fmt: skip
    trainer = Trainer(cfg, make_engine=PlainEngine)

    def state(part: str) -> list[torch.Tensor]:
        return [v.clone() for k, v in trainer.model.state_dict().items() if f".{part}" in k]

    changed_p, changed_w = [], []
    for step in range(10):
        p, w = state("projection"), state("weight_q")
        trainer.train_step()
        if any(not torch.equal(a, b) for a, b in zip(p, state("projection"), strict=True)):
            changed_p.append(step)
        if any(not torch.equal(a, b) for a, b in zip(w, state("weight_q"), strict=True)):
            changed_w.append(step)
    schedule = UpdateSchedule(cfg.loqt, cfg.train.steps)
    assert changed_p == [s for s in range(10) if schedule.is_refresh(s)] == [0, 4, 8]
    assert changed_w == [0, 2, 4, 6, 8]


def test_compensation_iterations_reach_the_merge(data_dir):
    """loqt.compensation_iters is what the trainer's merges use: off, the merge installs B = 0; on,
    B starts from the compensated residual (what step 0's merge hands the engine)."""

    def b_from_the_merge(iters: int) -> float:
        trainer = Trainer(nano_config(data_dir, f"loqt.compensation_iters={iters}"), make_engine=PlainEngine)
        installed, set_param = [], trainer.engine.set_param
        trainer.engine.set_param = lambda p, value: (
            installed.append(float(value.abs().sum())),
            set_param(p, value),
        )
        trainer.train_step()
        assert len(installed) == len(trainer.layers)
        return sum(installed)

    assert b_from_the_merge(0) == 0 and b_from_the_merge(5) > 0


@pytest.mark.parametrize(
    "extra", [[], ["loqt.refresh=layerwise"], ["optim.per_layer=true", "train.grad_accum=2"]],
    ids=["exact", "layerwise", "per-layer, accumulation"],
)  # fmt: skip
def test_the_first_step_trains_the_wrapped_matrices(data_dir, extra):
    """Step 0's merge and refresh come before its optimizer step, so that step already moves B (it
    starts at zero with compensation off, and P is zero until a refresh) and the merge that set P
    is the step's only one."""
    cfg = nano_config(data_dir, "loqt.compensation_iters=0", *extra)
    trainer = Trainer(cfg, make_engine=PlainEngine)
    trainer.train_step()
    assert trainer.lr > 0 and trainer.counters["updates"] == 1
    for layer in trainer.layers:
        assert layer.projection_matrix().abs().sum() > 0 and layer.B.abs().sum() > 0


def test_the_tiny_model_left_at_its_defaults_trains_at_the_quality_benchs_tuned_lr_and_scale(data_dir):
    cfg = nano_config(data_dir, "model.size=tiny", "optim.lr=null", "train.steps=4")
    trainer = Trainer(cfg, make_engine=PlainEngine)
    for _ in range(2):
        trainer.train_step()
    assert {layer.scale for layer in trainer.layers} == {0.125}
    assert trainer.lr > 0 and trainer.lr == pytest.approx(3e-2 * lr_factor(1, cfg))
