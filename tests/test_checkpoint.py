"""checkpoint.py with the plain engine, no Ray: format, finding the latest, validation, exact resume."""

import json

import pytest
import torch
from conftest import nano_config

from loqt_ray import checkpoint
from loqt_ray.config import ConfigError
from loqt_ray.trainer import Trainer


def nano(data_dir, *extra):
    return nano_config(
        data_dir, "loqt.update_interval=3", "loqt.refresh_interval=6", "train.steps=12",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.log_every=1", "train.eval_every=12", *extra,
    )  # fmt: skip


def losses(rows):
    return {row["step"]: row["train_loss"] for row in rows}


def test_save_at_half_then_restore_in_a_new_trainer_equals_the_straight_run(data_dir, tmp_path):
    straight_rows = []
    straight = Trainer(nano(data_dir))
    straight.train(straight_rows.append)

    first_rows, saved = [], []
    first = Trainer(nano(data_dir, "train.stop_at_step=6", "train.checkpoint_every=3"))
    first.train(first_rows.append, saved.append)
    assert [state["step"] for state in saved] == [3, 6]
    for state in saved:
        checkpoint.write(tmp_path / f"checkpoint_{state['step']}", state)

    newest = checkpoint.latest(tmp_path)
    assert newest == tmp_path / "checkpoint_6" and checkpoint.step_of(newest) == 6
    resumed_rows = []
    resumed = Trainer(nano(data_dir))
    resumed.resume(checkpoint.read(newest / checkpoint.STATE_FILE))
    assert resumed.step == 6 and resumed.counters["updates"] == first.counters["updates"] == 2
    final = resumed.train(resumed_rows.append)

    expected = losses(straight_rows)
    got = {**losses(first_rows), **losses(resumed_rows)}
    assert got.keys() == expected.keys() and all(abs(got[s] - expected[s]) < 1e-6 for s in expected)
    assert final["val_ppl"] == pytest.approx(straight_rows[-1]["val_ppl"], rel=1e-6)
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name  # NF4 bytes, P and every trainable value
    assert "grad_norm" in straight_rows[-1] and straight_rows[-1]["grad_norm"] > 0


def test_latest_is_by_step_not_by_name_and_bad_files_are_refused(data_dir, tmp_path):
    state = Trainer(nano(data_dir, "train.steps=1")).checkpointer.state(1, {"updates": 1})
    checkpoint.write(tmp_path / "run" / "checkpoint_b", {**state, "step": 4})
    checkpoint.write(tmp_path / "run" / "checkpoint_a", {**state, "step": 8})
    assert checkpoint.latest(tmp_path / "run").name == "checkpoint_a"
    assert checkpoint.find(tmp_path / "run") == tmp_path / "run" / "checkpoint_a" / checkpoint.STATE_FILE
    assert checkpoint.latest(tmp_path / "nothing") is None
    with pytest.raises(ConfigError, match="neither a run directory"):
        checkpoint.find(tmp_path / "nothing")

    path = tmp_path / "run" / "checkpoint_a" / checkpoint.STATE_FILE
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated or not a torch checkpoint"):
        checkpoint.check_file(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match="not a loqt-ray checkpoint"):
        checkpoint.read(foreign)
    assert json.loads((tmp_path / "run" / "checkpoint_a" / checkpoint.STEP_FILE).read_text()) == {"step": 8}


def test_buffers_of_another_shape_do_not_fit(data_dir):
    state = Trainer(nano(data_dir, "train.steps=1")).checkpointer.state(1, {})
    other = Trainer(nano(data_dir, "train.steps=1", "loqt.rank=4"))
    with pytest.raises(ValueError, match="does not fit this model"):
        checkpoint.load_buffers(other.model, state["buffers"])
