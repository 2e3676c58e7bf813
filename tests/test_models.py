import torch

from loqt_ray.config import MODEL_SIZES
from loqt_ray.models import build_model


def test_registry_has_paper_sizes():
    assert {"60m", "130m", "350m", "1b", "7b", "13b"} <= set(MODEL_SIZES)
    assert MODEL_SIZES["1b"].intermediate == 5461 and MODEL_SIZES["13b"].heads == 40


def test_60m_has_about_58m_parameters():
    model = build_model("60m", 32000)
    n = sum(p.numel() for p in model.parameters())
    assert n == MODEL_SIZES["60m"].parameter_count(32000)
    assert 57.5e6 < n < 58.5e6


def test_small_sizes_match_formula():
    for size in ("nano", "tiny", "small"):
        model = build_model(size, 4096)
        assert sum(p.numel() for p in model.parameters()) == MODEL_SIZES[size].parameter_count(4096)
    assert 1e6 < MODEL_SIZES["tiny"].parameter_count(8192) < 5e6
    # The paper's big sizes: the formula gives the expected scale without building them.
    assert 6.5e9 < MODEL_SIZES["7b"].parameter_count(32000) < 6.8e9


def test_seed_determinism_and_local_directory_roundtrip(tmp_path):
    a, b = build_model("nano", 512, seed=3), build_model("nano", 512, seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    a.save_pretrained(tmp_path / "m")
    loaded = build_model("ignored", 0, path=str(tmp_path / "m"))
    ids = torch.randint(0, 512, (2, 16))
    a.eval(), loaded.eval()
    assert torch.allclose(a(ids).logits, loaded(ids).logits)
