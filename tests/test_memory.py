import re

import pytest
import torch
from conftest import nano_config

from loqt_ray.cli import main
from loqt_ray.config import LoQTConfig
from loqt_ray.engine import PlainEngine
from loqt_ray.loqt import apply_loqt
from loqt_ray.memory import GIB, Assumptions, estimate, nf4_bytes
from loqt_ray.models import build_model
from loqt_ray.quant import NF4Tensor

# The model as this CPU trainer holds it: everything full-precision in fp32, torch AdamW
# (two fp32 moments and an fp32 step counter per trainable tensor).
FP32 = dict(param_bytes=4, grad_bytes=4, state_bytes=4, step_counter_bytes=4)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    "numel,block,dq",
    [(128 * 352, 64, True), (100 * 37, 64, True), (100 * 37, 128, False), (4096 * 3, 4096, True)],
)
def test_nf4_bytes_match_bitsandbytes(numel, block, dq):
    assert nf4_bytes(numel, block, dq) == _bytes(NF4Tensor(torch.randn(numel, 1), block, dq).buffers())


@pytest.mark.parametrize(
    "method,extra",
    [
        ("full", {}),
        ("loqt", {}),
        ("loqt", {"quantize_projection": False}),
        ("loqt-nq", {}),
        ("loqt", {"quantize_projection": True, "double_quant": False, "quant_block_size": 128}),
    ],
)
def test_components_equal_the_real_tensors_after_a_training_step(method, extra):
    vocab, rank = 512, 24
    model = build_model("tiny", vocab)
    loqt = LoQTConfig(method=method, rank=rank, **extra)
    apply_loqt(model, loqt)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, vocab, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = _bytes(p.grad for p in trainable)
    optimizer.step()

    a = Assumptions(
        **FP32,
        block_size=extra.get("quant_block_size", 64),
        double_quant=extra.get("double_quant", True),
        quantize_projection=loqt.quantize_projection,
    )
    est = estimate("tiny", method, rank, vocab=vocab, a=a)
    assert est.weights == _bytes(model.state_dict().values())
    assert est.gradients == grads
    assert est.optimizer_states == _bytes(t for s in optimizer.state.values() for t in s.values())


# Paper Table 1's memory column (GiB): weights + optimizer states, full-rank and LoQT.
PAPER = {
    "60m": (128, 0.36, 0.23),
    "130m": (256, 0.76, 0.49),
    "350m": (256, 2.06, 0.98),
    "1b": (512, 7.80, 3.16),
}


@pytest.mark.parametrize("size", list(PAPER))
def test_reproduces_the_paper_memory_column_within_10_percent(size):
    rank, full_gib, loqt_gib = PAPER[size]
    a = Assumptions(quantize_projection=True)  # one assumption set for every size: bf16, W and P in NF4
    for method, paper in (("full", full_gib), ("loqt", loqt_gib)):
        e = estimate(size, method, rank, vocab=32000, a=a)
        assert (e.weights + e.optimizer_states) / GIB == pytest.approx(paper, rel=0.10), method


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.name=adamw"],
        ["optim.name=adam8bit"],
        ["optim.name=adam8bit", "train.dtype=bfloat16", "train.master_weights=false"],
        ["loqt.method=full", "optim.name=adamw"],
        ["loqt.method=loqt-nq", "optim.name=adamw"],
        ["loqt.quantize_projection=true", "optim.name=adam8bit"],
    ],
    ids=["adamw", "adam8bit", "16-bit", "full", "loqt-nq", "nf4-P"],
)
def test_trainer_accounting_equals_what_the_plain_engine_holds(data_dir, extra):
    """`loqt-ray memory` (this trainer's accounting) against the real trainer after a step: the
    weights and optimizer states to the byte, the per-layer gradient bound by the largest tensor."""
    from loqt_ray.config import load_config
    from loqt_ray.engine import optimizer_tensors, tensor_bytes
    from loqt_ray.memory import trainer_estimate
    from loqt_ray.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"data.data_dir={data_dir}",
            "data.vocab_size=2048",
            "data.seq_len=64",
            "model.size=tiny",
            "loqt.rank=24",
            "optim.per_layer=true",
            "train.steps=2",
            "train.micro_batch_size=2",
            "train.eval_tokens=256",
            *extra,
        ],
    )
    trainer = Trainer(cfg, make_engine=PlainEngine)
    trainer.train_step()
    estimate = trainer_estimate(cfg)
    assert estimate.weights == tensor_bytes(trainer.model.state_dict().values())
    assert estimate.optimizer_states == tensor_bytes(optimizer_tensors(trainer.engine._optimizers))
    assert estimate.gradients == max(tensor_bytes([p]) for p in trainer.engine.params)
    assert estimate.master == 0 and all(p.grad is None for p in trainer.engine.params)  # freed in backward


def test_the_refresh_method_sets_what_refresh_steps_add_on_the_device_and_in_host_memory():
    """7B at rank 1024: exact capture holds every wrapped W's fp32 gradient on the device; offload
    holds them in bf16 host memory (beside the bf16 weights kept for step 0), the device one
    layer's at a time; layerwise holds every new P as stored (NF4) and one layer's SVD."""
    from loqt_ray.config import MODEL_SIZES, load_config
    from loqt_ray.memory import nf4_bytes, svd_bytes, trainer_estimate

    base = ["model.size=7b", "loqt.rank=1024", "optim.name=adam8bit", "optim.per_layer=true",
            "scale.use_gpu=true", "train.dtype=bfloat16"]  # fmt: skip

    def estimate(how: str, accum: int = 4):  # layerwise refreshes need one micro-batch per step
        return trainer_estimate(
            load_config(None, [*base, f"loqt.refresh={how}", f"train.grad_accum={accum}"])
        )

    each = {"exact": estimate("exact"), "offload": estimate("offload"), "layerwise": estimate("layerwise", 1)}
    mats = [(min(o, i), max(o, i)) for o, i in MODEL_SIZES["7b"].linear_shapes()]
    dense = sum(m * n for m, n in mats)
    assert each["exact"].refresh == 4 * dense and each["exact"].refresh / GIB == pytest.approx(24.1, abs=0.05)
    assert each["offload"].refresh == 10 * max(m * n for m, n in mats)  # one layer's, inside backward
    assert each["offload"].host == 2 * dense + 2 * dense  # the buffers, and W kept for step 0
    assert each["exact"].host == each["layerwise"].host == 2 * dense
    p_nf4 = sum(nf4_bytes(m * 1024) for m, _ in mats)
    assert each["layerwise"].refresh == p_nf4 + svd_bytes(mats)
    assert each["exact"].steady == each["offload"].steady  # refreshes change only refresh steps
    assert each["layerwise"].steady == estimate("exact", 1).steady
    on_cpu = trainer_estimate(
        load_config(None, [*base, "scale.use_gpu=false", "loqt.refresh=offload", "train.grad_accum=4"])
    )
    assert on_cpu.host == 0 and on_cpu.refresh == 2 * dense + 4 * max(m * n for m, n in mats)


def test_per_layer_updates_under_accumulation_hold_every_gradient_between_micro_batches(data_dir):
    """With grad_accum > 1 each tensor's gradient lives from the first micro-batch to its step in
    the last one: the estimate counts them all, as the trainer holds them after a micro-batch."""
    from loqt_ray.engine import tensor_bytes
    from loqt_ray.memory import trainer_estimate
    from loqt_ray.trainer import Trainer

    cfg = nano_config(data_dir, "optim.per_layer=true", "train.grad_accum=2", "train.micro_batch_size=2")
    trainer = Trainer(cfg, make_engine=PlainEngine)
    ids, labels = trainer.stream.next_batch()
    trainer.engine.backward(trainer.engine.model(input_ids=ids, labels=labels).loss / 2)
    held = [p.grad for p in trainer.engine.params]
    assert all(g is not None for g in held)  # the first micro-batch steps nothing
    assert trainer_estimate(cfg).gradients == tensor_bytes(held)


def test_cuda_graphs_add_a_second_pass_of_activations_and_gradients_on_refresh_steps():
    """Refresh steps run eagerly while the recording's pool keeps its own activations and gradients
    (one per trainable value, bf16 under DeepSpeed on a GPU); full-rank never refreshes."""
    from loqt_ray.config import load_config
    from loqt_ray.loqt import apply_loqt
    from loqt_ray.memory import trainer_estimate
    from loqt_ray.models import build_model

    for method in ("loqt", "full"):
        base = ["model.size=nano", "data.vocab_size=2048", f"loqt.method={method}", "scale.use_gpu=true",
                "train.dtype=bfloat16"]  # fmt: skip
        cfg = load_config(None, base)
        eager, graphs = (
            trainer_estimate(cfg),
            trainer_estimate(load_config(None, [*base, "train.cuda_graphs=true"])),
        )
        assert graphs.steady == eager.steady and graphs.refresh == eager.refresh and eager.graphs == 0
        if method == "full":
            assert graphs.graphs == 0
            continue
        model = apply_loqt(build_model("nano", 2048, 128, seed=0), cfg.loqt)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert graphs.graphs == pytest.approx(eager.activations + 2 * trainable)
        assert graphs.peak == eager.peak + graphs.graphs


def test_memory_command_prints_the_table_and_the_largest_batch(capsys):
    argv = [
        "memory",
        "--model",
        "7b",
        "--rank",
        "1024",
        "--optimizer",
        "adam8bit",
        "--per-layer",
        "--vocab",
        "32000",
        "--batch",
        "1",
        "--gpu-gb",
        "23",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("7b, loqt rank 1024, vocab 32000, micro-batch 1 x seq 256, on a GPU")
    assert "per-layer updates, adam8bit" in out and "| refresh-step peak |" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"largest micro-batch within 23 GiB: \d+ \(peak \d+\.\d GiB, refresh steps included\)", last
    )
    assert int(last.split(": ")[1].split()[0]) >= 1 and float(last.split("peak ")[1].split()[0]) <= 23
    # The shorthands are --set of config fields: the same call through --set prints the same.
    sets = [
        "model.size=7b",
        "loqt.rank=1024",
        "optim.name=adam8bit",
        "optim.per_layer=true",
        "data.vocab_size=32000",
        "train.micro_batch_size=1",
    ]
    assert main(["memory", *(a for s in sets for a in ("--set", s)), "--gpu-gb", "23"]) == 0
    assert capsys.readouterr().out == out

    # The paper's accounting stays behind --paper.
    assert main([*argv, "--paper", "--method", "loqt"]) == 0
    out = capsys.readouterr().out
    assert "the paper's accounting" in out and "| weights |" in out and "| optimizer states |" in out
    e1 = estimate("7b", "loqt", 1024, batch=1, a=Assumptions(optimizer="adam8bit"))
    e2 = estimate("7b", "loqt", 1024, batch=2, a=Assumptions(optimizer="adam8bit"))
    assert e2.activations == pytest.approx(2 * e1.activations) and e2.weights == e1.weights
    per_layer = estimate("7b", "loqt", 1024, a=Assumptions(optimizer="adam8bit", per_layer=True))
    assert per_layer.gradients < e1.gradients / 5


@pytest.mark.parametrize("job", ["train_7b_24gb.yaml", "train_13b_24gb.yaml", "train_7b_4gpu.yaml"])
def test_the_shipped_large_jobs_take_real_batches_within_23_gib_by_this_trainers_accounting(job, capsys):
    """At least 131,072 tokens per optimizer step (the paper's 512 x 256) with each job's own
    micro-batch fitting 23 GiB per worker, refresh steps included; the single-GPU jobs at the
    largest micro-batch that fits."""
    from pathlib import Path

    from loqt_ray.config import load_config
    from loqt_ray.memory import trainer_estimate

    config = Path(__file__).resolve().parent.parent / "jobs" / job
    cfg = load_config(config)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.scale.num_workers * cfg.data.seq_len
    assert tokens >= 131_072 and cfg.train.activation_checkpointing
    assert main(["memory", "--config", str(config), "--gpu-gb", "23"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fits = int(last.split(": ")[1].split()[0])
    estimate = trainer_estimate(cfg)
    assert estimate.peak / GIB <= 23 and fits >= cfg.train.micro_batch_size
    if cfg.scale.num_workers == 1:
        assert fits == cfg.train.micro_batch_size
    assert estimate.peak <= 1.10 * estimate.steady  # refresh steps within 1.10x of steady ones


@pytest.mark.parametrize(
    "extra,width",
    [
        (["optim.name=adamw"], 4),
        (["optim.name=adam8bit", "train.dtype=bfloat16", "train.master_weights=false"], 2),
    ],
    ids=["fp32", "16-bit"],
)
def test_activation_accounting_equals_what_autograd_saves(data_dir, extra, width):
    from loqt_ray.config import MODEL_SIZES, load_config
    from loqt_ray.memory import saved_activation_bytes
    from loqt_ray.trainer import Trainer

    cfg = load_config(
        None,
        [f"data.data_dir={data_dir}", "data.vocab_size=2048", "data.seq_len=64", "model.size=tiny",
         "loqt.rank=24", "optim.per_layer=true", "train.steps=2", "train.micro_batch_size=4",
         "train.eval_tokens=256", *extra],
    )  # fmt: skip
    trainer = Trainer(cfg, make_engine=PlainEngine)
    ids, labels = trainer.stream.next_batch()
    own = {t.untyped_storage().data_ptr() for t in [*trainer.model.parameters(), *trainer.model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), trainer.autocast:
        trainer.model(input_ids=ids, labels=labels)
    tokens = ids.numel()
    formula = saved_activation_bytes(MODEL_SIZES["tiny"], 2048, tokens, 24, True, width)
    backward_transients = tokens * 2048 * (4 + 4 + width)  # the logits' gradients, not saved tensors
    assert sum(saved.values()) == pytest.approx(formula - backward_transients, rel=0.05)


def test_with_activation_checkpointing_the_blocks_save_nothing_for_backward(data_dir):
    """With train.activation_checkpointing, what the forward saves outside the checkpointed
    blocks is the final norm's and the loss's part of the accounting (the blocks keep only their
    inputs, which the recompute reads): the estimate's activations less one block's and the
    inputs, and a small share of what the same forward saves without it."""
    from loqt_ray.config import MODEL_SIZES, load_config
    from loqt_ray.memory import saved_activation_bytes
    from loqt_ray.trainer import Trainer

    def saved_bytes(checkpointing: bool) -> int:
        cfg = load_config(
            None,
            [f"data.data_dir={data_dir}", "data.vocab_size=2048", "data.seq_len=64", "model.size=tiny",
             "loqt.rank=24", "train.steps=2", "train.micro_batch_size=4", "train.eval_tokens=256",
             f"train.activation_checkpointing={checkpointing}"],
        )  # fmt: skip
        trainer = Trainer(cfg, make_engine=PlainEngine)
        ids, labels = trainer.stream.next_batch()
        own = {
            t.untyped_storage().data_ptr() for t in [*trainer.model.parameters(), *trainer.model.buffers()]
        }
        saved = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in own:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.model(input_ids=ids, labels=labels)
        return sum(saved.values()), ids.numel()

    on, tokens = saved_bytes(True)
    off, _ = saved_bytes(False)
    shape, vocab = MODEL_SIZES["tiny"], 2048
    # each block's fp32 input, the final norm's input and output, the loss's fp32 log-softmax (the
    # accounting with checkpointing, less the logits' gradients that backward makes)
    kept = tokens * (shape.layers * shape.hidden * 4 + shape.hidden * (4 + 4) + vocab * 4)
    checkpointed = saved_activation_bytes(shape, vocab, tokens, 24, True, 4, checkpoint_width=4)
    assert kept == checkpointed - tokens * vocab * (4 + 4 + 4)  # the loss's part is the larger here
    assert on == pytest.approx(kept, rel=0.1)
    assert on < off / 3


def test_an_auto_micro_batch_is_the_largest_that_fits_the_gpu_share_and_keeps_the_step(tmp_path):
    """train.micro_batch_size auto: the largest divisor of sequences_per_step whose refresh-step peak
    fits scale.gpu_memory_gb x scale.gpus_per_worker, grad_accum the rest; a config over its share
    is said not to fit."""
    from loqt_ray.config import load_config
    from loqt_ray.memory import fit_shortfall, trainer_estimate

    base = ["model.size=1b", "loqt.rank=512", "scale.use_gpu=true", "train.dtype=bfloat16",
            "scale.gpu_memory_gb=48", "scale.gpus_per_worker=0.5",
            "train.sequences_per_step=512"]  # fmt: skip
    cfg = load_config(None, [*base, "train.micro_batch_size=auto"])
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    assert micro * accum == 512 and 1 < micro < 512
    assert trainer_estimate(cfg).peak <= 24 * GIB and fit_shortfall(cfg) is None
    bigger = [d for d in range(micro + 1, 513) if 512 % d == 0][0]
    over = load_config(None, [*base, f"train.micro_batch_size={bigger}", f"train.grad_accum={512 // bigger}"])
    assert trainer_estimate(over).peak > 24 * GIB
    assert fit_shortfall(over).startswith("does not fit: peak ") and fit_shortfall(over).endswith(
        "> 24.00 GiB"
    )
