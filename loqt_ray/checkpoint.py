"""The one owner of the checkpoint: its format, writing, finding the latest, validating, restoring.

A checkpoint is a directory holding `state.pt` (one dict of plain tensors and numbers,
loaded with weights_only=True) and `step.json` (its step, readable without loading it).
Under Ray Train the directories are Ray's `checkpoint_*` in the run directory; anything
else (tests, export-hf) writes and reads the same layout through this module.

The state, built on every rank (gathering ZeRO partitions is a collective):

    step       optimizer steps done; checkpoints are taken between steps, after any
               merge, so no refresh gradient is half-accumulated and the merge schedule
               position is the step itself
    counters   train/update wall time and merges done
    stream     the data position
    rng        torch's CPU generator
    buffers    the model's non-parameter tensors: NF4 W with its quant state, P
    engine     trainable values and optimizer state (engine.Engine.state_dict)
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from .config import ConfigError

STATE_FILE = "state.pt"
STEP_FILE = "step.json"


class Checkpointer:
    """Builds and restores the state of one worker's model, engine and data stream."""

    def __init__(self, model: torch.nn.Module, engine, stream):
        self.model, self.engine, self.stream = model, engine, stream

    def state(self, step: int, counters: dict) -> dict:
        """The state at `step`. On the CPU its tensors are the live ones (no copy of a big model at
        each checkpoint): write it before the next step changes them."""
        return {
            "step": step,
            "counters": dict(counters),
            "stream": self.stream.state_dict(),
            "rng": torch.get_rng_state(),
            "buffers": buffers_of(self.model),
            "engine": self.engine.state_dict(),
        }

    def restore(self, state: dict) -> tuple[int, dict]:
        """Load `state` into the model, engine and stream; return (step, counters)."""
        load_buffers(self.model, state["buffers"])
        self.engine.load_state_dict(state["engine"])
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng"])
        return state["step"], dict(state["counters"])


def buffers_of(model: torch.nn.Module) -> dict:
    params = {name for name, _ in model.named_parameters()}
    return {k: v.cpu() for k, v in model.state_dict().items() if k not in params}


def load_buffers(model: torch.nn.Module, buffers: dict) -> None:
    """A checkpoint's buffers (NF4 W with its quant state, P) into `model`; ValueError if they do
    not fit it. Trainable values come separately (through the engine, or copied by export-hf)."""
    from .loqt import loqt_layers

    params = {name for name, _ in model.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(buffers, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"checkpoint does not fit this model: {str(exc).splitlines()[-1].strip()}") from None
    if unexpected or set(missing) != params:
        raise ValueError(
            f"checkpoint does not fit this model: missing {sorted(set(missing) - params)[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for _, layer in loqt_layers(model):
        layer.initial_weight = None  # step 0 has run: W already holds its compensated value


def write(directory: Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / STEP_FILE).write_text(json.dumps({"step": state["step"]}))
    return directory


def step_of(directory: Path) -> int:
    meta = Path(directory) / STEP_FILE
    return json.loads(meta.read_text())["step"] if meta.exists() else -1


def latest(run_dir: Path) -> Path | None:
    """The checkpoint directory under `run_dir` holding the highest step, or None."""
    found = [state.parent for state in Path(run_dir).glob(f"checkpoint_*/{STATE_FILE}")]
    return max(found, key=step_of, default=None)


def find(source: str | Path) -> Path:
    """state.pt of a run directory's latest checkpoint, of a checkpoint directory, or the file itself."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / STATE_FILE).is_file():
        return source / STATE_FILE
    newest = latest(source) if source.is_dir() else None
    if newest is None:
        raise ConfigError(
            str(source),
            f"neither a run directory with checkpoint_*/{STATE_FILE}, a checkpoint directory "
            f"nor a {STATE_FILE} file",
        )
    return newest / STATE_FILE


def check_file(path: Path) -> None:
    """Cheap integrity check without loading: a torch checkpoint is a zip whose directory sits at
    the end, so a truncated or foreign file fails here instead of inside a worker."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            str(path),
            f"truncated or not a torch checkpoint ({exc}); delete that checkpoint directory to resume "
            "from an earlier one",
        ) from None


def read(path: Path) -> dict:
    """Load a state with weights_only=True; ConfigError naming the file if it is not one of ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or pickled-code files
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"
        raise ConfigError(str(path), f"not a loadable loqt-ray checkpoint ({reason})") from None
    if not isinstance(state, dict) or not {"buffers", "engine"} <= set(state):
        raise ConfigError(str(path), "not a loqt-ray checkpoint (no buffers/engine entries)")
    return state
