"""Packing into seq_len + 1 rows, shifted targets, the train/validation split, and get()."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import ByteTokenizer, DataError, PackedSequences, build_datasets
from moe_dist.data.packing import pack_rows, split_rows, tokenize_stream


def test_tokenize_stream_appends_eod_after_each_document() -> None:
    docs = datasets.Dataset.from_dict({"text": ["ab", "é", "c"]})
    stream = tokenize_stream(docs, ByteTokenizer(), "test-stream")
    assert stream.tolist() == [97, 98, 0, 0xC3, 0xA9, 0, 99, 0]
    assert stream.dtype == np.uint16


def test_pack_rows_cuts_consecutive_rows_and_drops_the_tail() -> None:
    stream = np.arange(23)
    rows = pack_rows(stream, seq_len=4, source="s")  # rows of 5, 4 rows, 3 tokens dropped
    assert rows.shape == (4, 5)
    assert rows[2].tolist() == [10, 11, 12, 13, 14]
    with pytest.raises(DataError, match=r"data.source = 's' gives 9 tokens, which pack into 1 "):
        pack_rows(np.arange(9), seq_len=4, source="s")


def test_targets_are_inputs_shifted_by_one(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(200))
    (tmp_path / "abc.txt").write_text(text)
    cfg = DataConfig(source=str(tmp_path / "abc.txt"), seq_len=16, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    bundle = build_datasets(cfg)
    stream = list(text.encode()) + [0]
    for split in (bundle.train, bundle.val):
        batch = split.get(torch.arange(len(split)))
        assert batch.shape == (len(split), 17) and batch.dtype == torch.int64
        inputs, targets = batch[:, :-1], batch[:, 1:]
        for i, row in enumerate(split.rows):
            start = int(row) * 17
            assert inputs[i].tolist() == stream[start: start + 16]
            assert targets[i].tolist() == stream[start + 1: start + 17]


def test_split_is_disjoint_complete_and_deterministic() -> None:
    train, val = split_rows(100, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again_train, again_val = split_rows(100, 0.1, seed=7)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert split_rows(100, 0.1, seed=8)[1].tolist() != val.tolist()
    assert val.tolist() != list(range(90, 100))  # a random subset, not the tail
    assert len(split_rows(3, 0.01, seed=0)[1]) == 1  # at least one validation row


def test_split_needing_all_rows_is_an_error() -> None:
    with pytest.raises(DataError, match=r"data.val_fraction = 0.8 of 2 packed sequences leaves none"):
        split_rows(2, 0.8, seed=0)


def test_get_maps_split_positions_to_rows() -> None:
    tokens = np.arange(30, dtype=np.uint16).reshape(6, 5)
    split = PackedSequences(tokens, np.array([1, 4, 5]))
    assert len(split) == 3 and split.seq_len == 4
    out = split.get(torch.tensor([2, 0]))
    assert out.dtype == torch.int64
    assert out.tolist() == [[25, 26, 27, 28, 29], [5, 6, 7, 8, 9]]
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 3\); got min 0, max 3"):
        split.get(torch.tensor([0, 3]))
