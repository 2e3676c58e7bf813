import pytest
import torch

from loqt_ray.cli import main
from loqt_ray.config import LoQTConfig
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
        ("loqt-nq", {}),
        ("loqt", {"quantize_projection": True, "double_quant": False, "quant_block_size": 128}),
    ],
)
def test_components_equal_the_real_tensors_after_a_training_step(method, extra):
    vocab, rank = 512, 24
    model = build_model("tiny", vocab)
    apply_loqt(model, LoQTConfig(method=method, rank=rank, **extra))
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
        quantize_projection=extra.get("quantize_projection", False),
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


def test_memory_command_prints_the_table_and_the_largest_batch(capsys):
    assert (
        main(
            [
                "memory",
                "--model",
                "7b",
                "--method",
                "loqt",
                "--rank",
                "1024",
                "--optimizer",
                "adam8bit",
                "--per-layer",
                "--vocab",
                "32000",
                "--gpu-gb",
                "24",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("7b, rank 1024, vocab 32000, adam8bit") and "per-layer updates" in out
    # The shorthands are --set of config fields: the same call through --set prints the same.
    assert (
        main(
            [
                "memory",
                "--method",
                "loqt",
                "--set",
                "model.size=7b",
                "--set",
                "loqt.rank=1024",
                "--set",
                "optim.name=adam8bit",
                "--set",
                "optim.per_layer=true",
                "--set",
                "data.vocab_size=32000",
                "--gpu-gb",
                "24",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == out
    assert (
        "| weights |" in out and "| optimizer states |" in out and "largest micro-batch within 24 GiB" in out
    )
    e1 = estimate("7b", "loqt", 1024, batch=1, a=Assumptions(optimizer="adam8bit"))
    e2 = estimate("7b", "loqt", 1024, batch=2, a=Assumptions(optimizer="adam8bit"))
    assert e2.activations == pytest.approx(2 * e1.activations) and e2.weights == e1.weights
    per_layer = estimate("7b", "loqt", 1024, a=Assumptions(optimizer="adam8bit", per_layer=True))
    assert per_layer.gradients < e1.gradients / 5
