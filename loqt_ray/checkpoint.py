"""The one owner of a run's checkpoints: their format, writing and staging, finding the latest,
validating, choosing and restoring the one a run resumes from, and Ray's record of them.

A checkpoint is a directory holding `state.pt` (one dict of plain tensors and numbers, loaded
with weights_only=True) and `step.json` (its step, readable without loading it). Under Ray Train
the directories are Ray's `checkpoint_*` in the run directory, handed to Ray from a staging
folder in the worker's temp dir; anything else (tests, export-hf) writes and reads the same
layout through this module.

The state (format 2), built on every rank (gathering ZeRO partitions is a collective):

    format     2
    config     the run's config (a dict), so a checkpoint describes its own model
    step       optimizer steps done; checkpoints are taken between steps, after any merge,
               so no refresh gradient is half-accumulated and the schedule's position is the step
    counters   train/update wall time and merges done
    stream     the data position
    rng        torch's CPU generator
    buffers    the model's non-parameter tensors by name: NF4 W with its quant state, P
    params     every trainable value in fp32, by parameter name
    optimizer  each trainable parameter's optimizer state, by parameter name (one encoding for
               every engine and ZeRO stage: engine.py)

Format 1 (no `format` key: trainable values and optimizer states as lists in parameter order,
in one of three encodings) still loads: `upgrade` names its entries by the model's parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from . import rundir
from .config import Config, ConfigError, LoQTConfig, ModelConfig, from_dict

FORMAT = 2
STATE_FILE = "state.pt"
STEP_FILE = "step.json"


class Checkpointer:
    """Builds and restores the state of one worker's model, engine and data stream."""

    def __init__(self, cfg: Config, model: torch.nn.Module, engine, stream):
        self.cfg, self.model, self.engine, self.stream = cfg, model, engine, stream

    def state(self, step: int, counters: dict) -> dict:
        """The state at `step`. On the CPU its tensors are the live ones (no copy of a big model at
        each checkpoint): write it before the next step changes them."""
        engine = self.engine.state_dict()
        return {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "step": step,
            "counters": dict(counters),
            "stream": self.stream.state_dict(),
            "rng": torch.get_rng_state(),
            "buffers": buffers_of(self.model),
            "params": engine["params"],
            "optimizer": engine["optimizer"],
        }

    def restore(self, state: dict) -> tuple[int, dict]:
        """Load `state` (either format) into the model, engine and stream; return (step, counters)."""
        state = upgrade(state, trainable_names(self.model))
        load_buffers(self.model, state["buffers"])
        self.engine.load_state_dict({"params": state["params"], "optimizer": state["optimizer"]})
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng"])
        return state["step"], dict(state["counters"])


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def upgrade(state: dict, names: list[str]) -> dict:
    """A state in format 2: as it is, or a format-1 state with its lists named by `names` (the
    model's trainable parameters, in the order format 1 listed them)."""
    if state.get("format") == FORMAT:
        return state
    engine = state["engine"]
    values, optimizer = engine["params"], engine["optimizer"]
    if len(values) != len(names):
        raise ValueError(f"its {len(values)} trainable values do not fit this model's {len(names)}")
    if isinstance(optimizer, list) and optimizer and "state" in optimizer[0]:  # per-layer: one each
        per_param = [opt["state"].get(0) for opt in optimizer]
    elif isinstance(optimizer, list):  # ZeRO-1/2: Adam moments per parameter, one step count
        step = torch.tensor(float(engine.get("optimizer_step", 0)))
        per_param = [{"step": step, **moments} if moments else None for moments in optimizer]
    else:  # a torch state dict (the plain engine, ZeRO stage 0)
        per_param = [optimizer["state"].get(i) for i in range(len(names))]
    return {
        **{k: v for k, v in state.items() if k != "engine"},
        "format": FORMAT,
        "params": dict(zip(names, values, strict=True)),
        "optimizer": {name: s for name, s in zip(names, per_param, strict=True) if s},
    }


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


# ---------------------------------------------------------------- files


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
    ours = isinstance(state, dict) and (
        {"buffers", "params", "optimizer"} <= set(state) or {"buffers", "engine"} <= set(state)
    )
    if not ours:
        raise ConfigError(str(path), "not a loqt-ray checkpoint (no buffers, trainable values, optimizer)")
    return state


# ---------------------------------------------------------------- the resume point


def resume_point(cfg: Config, out: Path) -> Path | None:
    """The checkpoint a rerun of this run resumes from (None for a new run), checked before
    anything starts: same model and loqt sections, a readable checkpoint file."""
    newest = latest(out)
    if newest is None:
        if (out / rundir.METRICS_FILE).exists():
            raise ConfigError(
                "train.name", f"{out} holds a run without a checkpoint to resume; choose another name"
            )
        return None
    saved = rundir.read_config(out)
    if saved.get("model") != cfg.to_dict()["model"] or _built_loqt(saved) != cfg.settled_loqt():
        raise ConfigError(
            "train.name",
            f"{out} was trained with another model or loqt section; resume with the same settings or "
            "choose another name",
        )
    check_file(newest / STATE_FILE)
    return newest


def _built_loqt(saved: dict) -> LoQTConfig | None:
    """The loqt section a saved run's model was built with (None if this version cannot read it):
    compared settled, a run saved with an explicit lora_alpha resumes under the default that equals
    it, and not under one that does not."""
    try:
        model = from_dict(ModelConfig, saved["model"], "model")
        loqt = from_dict(LoQTConfig, saved["loqt"], "loqt")
    except (ConfigError, KeyError):
        return None
    return Config(model=model, loqt=loqt).settled_loqt()


def resume_state(run_dir: Path, rank: int, world_size: int) -> dict | None:
    """The state every rank goes on from: rank 0 picks the run directory's newest readable
    checkpoint and the others load the same one. The directory, not Ray's record, is the source:
    after a lost worker Ray may restart the group before it registered the last checkpoint rank 0
    wrote, and a rerun of the command finds it there too (Train V2 has no resume_from_checkpoint)."""
    chosen, state = [None], None
    if rank == 0:
        for directory in sorted(run_dir.glob("checkpoint_*"), key=step_of, reverse=True):
            try:
                state = read(directory / STATE_FILE)
            except ConfigError:  # cut short while being written when its worker died: the one before
                continue
            chosen = [str(directory)]
            break
    if world_size > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    if chosen[0] is None or state is not None:
        return state
    path = Path(chosen[0]) / STATE_FILE
    if not path.exists():
        raise ConfigError(
            "train.output_dir", f"rank {rank} cannot read {path}: it must be on storage every node mounts"
        )
    return read(path)


# ---------------------------------------------------------------- staging folders

# A checkpoint goes to Ray from a folder of its own in the worker's temp dir, named after the worker's
# host and process: a worker killed before Ray took it (a lost node's peers, a restart, kill -9)
# leaves it. The host is in the name because containers can share a temp dir but not their PIDs.
STAGING_PREFIX = "loqt-ckpt-"


def _host_staging_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname()}-"


def staging_prefix(pid: int | None = None) -> str:
    """The start of the names of the checkpoint folders of process `pid` (this one) on this host."""
    return f"{_host_staging_prefix()}{os.getpid() if pid is None else pid}-"


def stage(state: dict, rank: int) -> Path:
    """A new staging folder for the checkpoint of `state`: written by rank 0, empty on the others
    (Ray's checkpoint reports are made by every rank)."""
    folder = Path(tempfile.mkdtemp(prefix=staging_prefix()))
    if rank == 0:
        write(folder, state)
    return folder


def remove_orphaned_staging(root: str | Path | None = None) -> None:
    """Delete the checkpoint folders in this host's temp dir (`root`) whose worker process is gone:
    each is a whole checkpoint (a 7B LoQT one is several GB), one per kill that landed between
    writing it and Ray copying it into the run directory."""
    host = _host_staging_prefix()
    for folder in Path(root or tempfile.gettempdir()).glob(f"{host}*-*"):
        # exactly PID-random (mkdtemp's part has no '-'): host "node" must not claim "node-12"'s
        parts = folder.name.removeprefix(host).split("-")
        if len(parts) == 2 and parts[0].isdigit() and not _process_alive(int(parts[0])):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ---------------------------------------------------------------- Ray's record

# Ray Train's record of the checkpoints a run reported (Train V2 keeps it in the run directory).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_stale_ray_record(out: Path) -> None:
    """Move Ray's checkpoint record aside, saying so on stderr, where Ray would refuse to start the
    run again from it: when it is not whole JSON (Ray rewrites it in place after every checkpoint,
    so a run killed at that moment, by kill -9 or the OOM killer, leaves it empty or cut short), or
    when it names a checkpoint directory that is gone (deleted by hand, as resume_point advises for
    a truncated one). Resuming needs only the run's own checkpoints (resume_state reads the
    directory); the record serves pruning to train.keep_checkpoints, which then covers only
    checkpoints written from here on."""
    record = out / RAY_SNAPSHOT
    try:
        saved = json.loads(record.read_bytes())
    except FileNotFoundError:  # a new run
        return
    except ValueError:  # JSONDecodeError; UnicodeDecodeError is one too
        why = "was cut short (the run was killed while writing it)"
    else:
        reported = saved.get("checkpoint_results", []) if isinstance(saved, dict) else []
        named = {r.get("checkpoint_dir_name") for r in reported if isinstance(r, dict)} - {None}
        gone = sorted(named - {p.name for p in out.iterdir()})
        if not gone:
            return
        why = f"names {len(gone)} checkpoint(s) no longer in {out} ({', '.join(gone)})"
    aside = _unused_name(record.with_name(record.name + ".stale"))
    record.replace(aside)
    print(
        f"Ray's checkpoint record {record} {why}: moved to {aside.name}; resuming from the run's "
        "own checkpoints, and those already there are no longer pruned to train.keep_checkpoints",
        file=sys.stderr,
        flush=True,
    )


def _unused_name(path: Path) -> Path:
    """`path`, or `path`.2, .3, ... whichever is free: a record set aside at an earlier resume stays."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
