import json
import time

import numpy as np
import pytest
import torch

from loqt_ray.config import ConfigError, DataConfig
from loqt_ray.data import (
    IGNORE_INDEX,
    SequenceStream,
    load_documents,
    pack,
    prepare,
    split_documents,
    val_rows,
)


def real_tokens(split):
    """The real (non-padding) tokens of a packed split, in order."""
    return np.concatenate([row[:n] for row, n in zip(split.tokens, split.lengths, strict=True)])


def test_embedded_corpus_size(sotu):
    info = sotu.info
    assert info["train"]["documents"] + info["val"]["documents"] == 249
    assert info["train"]["tokens"] > 1_000_000 and info["val"]["tokens"] > 20_000


def test_packing_loses_and_duplicates_no_token(sotu, data_dir):
    cfg = DataConfig(data_dir=data_dir, vocab_size=2048, seq_len=128)
    docs, _ = load_documents(cfg)
    train_docs, _ = split_documents(docs, cfg.val_fraction)
    eos = sotu.tokenizer.eos_token_id
    expected = np.concatenate(
        [sotu.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in train_docs["text"]]
    )
    assert np.array_equal(real_tokens(sotu.train), expected)
    assert int(sotu.train.lengths.sum()) == len(expected)
    assert (sotu.train.lengths[:-1] == 128).all()  # only the last row may be padded


def test_pack_pads_only_the_tail():
    stream = np.arange(1, 11, dtype=np.int32)
    split = pack(stream, 4, pad_id=0)
    assert split.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    ids, labels = split.batch([2])
    assert labels.tolist() == [[9, 10, IGNORE_INDEX, IGNORE_INDEX]]


def test_train_and_validation_documents_are_disjoint(data_dir):
    docs, _ = load_documents(DataConfig(data_dir=data_dir))
    train, val = split_documents(docs, 0.05)
    assert len(train) + len(val) == len(docs) == 249
    assert not set(train["id"]) & set(val["id"])
    assert not set(train["text"]) & set(val["text"])
    # stable: the same split for the same documents, whatever their order
    train2, val2 = split_documents(docs.shuffle(seed=1), 0.05)
    assert sorted(val2["id"]) == sorted(val["id"])


def test_tokenizer_round_trip(sotu):
    tok = sotu.tokenizer
    for text in ["Fellow-Citizens of the Senate:\n\n  We the People...", "naïve café – 東京 🚀\ttabs"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_stream_resumes_exactly(sotu):
    a = SequenceStream(sotu.train, micro_batch=7, seed=5)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    expected = [a.next_batch()[0] for _ in range(4)]
    b = SequenceStream(sotu.train, micro_batch=7, seed=5)
    b.load_state_dict(state)
    assert all((x == b.next_batch()[0]).all() for x in expected)
    # far into a later epoch, without replaying what came before
    n = len(sotu.train)
    b.load_state_dict({**state, "consumed": 10 * n + 3})
    ids, _ = b.next_batch()
    rows = np.random.default_rng([5, 10]).permutation(n)[3:10]  # epoch 10's permutation, at once
    assert torch.equal(ids, sotu.train.batch(rows)[0]) and b._perm_epoch == 10
    with pytest.raises(ConfigError):
        b.load_state_dict({**state, "seed": 6})


def test_two_ranks_see_every_sequence_once_per_epoch(sotu):
    n, mb = len(sotu.train), 5
    ranks = [SequenceStream(sotu.train, mb, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = {0: [], 1: []}
    position_rows = []
    step = 0
    while step * 2 * mb < n:
        for r, s in enumerate(ranks):
            rows = s.rows_at(s.consumed)
            s.next_batch()
            seen[r] += rows
            position_rows += [(step * 2 * mb + r * mb + j, row) for j, row in enumerate(rows)]
        step += 1
    first_epoch = [row for pos, row in sorted(position_rows) if pos < n]
    assert sorted(first_epoch) == list(range(n))
    assert ranks[0].consumed == ranks[1].consumed
    # a new epoch reshuffles
    assert SequenceStream(sotu.train, mb, 0).rows_at(n) != SequenceStream(sotu.train, mb, 0).rows_at(0)


def test_validation_rows_are_fixed_and_sharded(sotu):
    rows = val_rows(sotu.val, 40 * 128)
    assert rows == list(range(40))
    assert sorted(val_rows(sotu.val, 40 * 128, 0, 2) + val_rows(sotu.val, 40 * 128, 1, 2)) == rows


def test_local_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document number {i}. " * 50)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"Line {i} " * 40}) for i in range(10)))
    for source, field in ((tmp_path / "docs", "text"), (jsonl, "body")):
        cfg = DataConfig(
            source=str(source),
            text_field=field,
            data_dir=str(tmp_path / "cache"),
            vocab_size=300,
            seq_len=16,
            val_fraction=0.2,
        )
        ds = prepare(cfg)
        assert ds.info["train"]["documents"] + ds.info["val"]["documents"] == (6 if field == "text" else 10)
        assert ds.val.tokens.shape[1] == 16


@pytest.mark.parametrize(
    "source,field,message",
    [
        ("/no/such/path", "text", "data.source"),
        ("EMPTY", "text", "no .parquet"),
        ("JSONL", "content", "data.text_field"),
    ],
)
def test_bad_sources_name_the_field(tmp_path, source, field, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "more"}\n')
    source = {"EMPTY": str(tmp_path / "empty"), "JSONL": str(tmp_path / "a.jsonl")}.get(source, source)
    with pytest.raises(ConfigError, match=message):
        prepare(DataConfig(source=source, text_field=field, data_dir=str(tmp_path / "cache")))


def test_hub_source_offline_fails_fast(tmp_path, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="data.source: .*hf:allenai/c4"):
        prepare(DataConfig(source="hf:allenai/c4", hub_config="en", data_dir=str(tmp_path)))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # and without the offline flag: the probe fails, no hang
    with pytest.raises(ConfigError, match="data.source"):
        prepare(DataConfig(source="hf:allenai/c4", hub_config="en", data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 30


def test_local_tokenizer_directory(sotu, tmp_path, data_dir):
    sotu.tokenizer.save_pretrained(tmp_path / "tok")
    again = prepare(DataConfig(data_dir=data_dir, seq_len=128, tokenizer=str(tmp_path / "tok")))
    assert np.array_equal(again.train.tokens, sotu.train.tokens)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        prepare(DataConfig(data_dir=data_dir, tokenizer=str(tmp_path / "bad")))
