"""The packed-data cache: reuse without re-tokenising, invalidation, atomic publication."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import DataError, build_datasets
from moe_dist.data import pipeline as pipeline_mod
from moe_dist.data.cache import cache_root, publish_dir, publish_file

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 4


def _cfg(tmp_path: Path, **kw: object) -> DataConfig:
    return DataConfig(source=str(tmp_path / "richard.txt"), seq_len=16, val_fraction=0.2,
                      cache_dir=str(tmp_path / "cache"), **kw)  # type: ignore[arg-type]


def _forbid_loading(monkeypatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not load or tokenise the documents")

    monkeypatch.setattr(pipeline_mod, "load_documents", fail)
    monkeypatch.setattr(pipeline_mod, "tokenize_stream", fail)


def test_second_build_reads_the_cache(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "richard.txt").write_text(TEXT)
    first = build_datasets(_cfg(tmp_path))
    assert not first.cache_hit
    assert first.cache_path.parent == tmp_path / "cache" / "packed"
    assert sorted(p.name for p in first.cache_path.iterdir()) == ["meta.json", "tokens.npy"]
    _forbid_loading(monkeypatch)
    second = build_datasets(_cfg(tmp_path))
    assert second.cache_hit and second.cache_path == first.cache_path
    assert isinstance(second.train.tokens, np.memmap)
    every = torch.arange(len(first.train))
    assert torch.equal(first.train.get(every), second.train.get(every))
    assert first.val.rows.tolist() == second.val.rows.tolist()


def test_bpe_warm_build_also_skips_the_text(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "richard.txt").write_text(TEXT)
    cold = build_datasets(_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=280))
    _forbid_loading(monkeypatch)
    monkeypatch.setattr("moe_dist.data.tokenizer.train_bpe", lambda *a: pytest.fail("retrained"))
    warm = build_datasets(_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=280))
    assert warm.cache_hit and warm.cache_path == cold.cache_path
    assert warm.tokenizer.fingerprint == cold.tokenizer.fingerprint


def test_changed_file_or_settings_miss_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "richard.txt"
    path.write_text(TEXT)
    first = build_datasets(_cfg(tmp_path))
    path.write_text(TEXT + "Grim-visaged war hath smooth'd his wrinkled front.")
    changed = build_datasets(_cfg(tmp_path))
    assert not changed.cache_hit and changed.cache_path != first.cache_path
    longer = build_datasets(DataConfig(source=str(path), seq_len=32, cache_dir=str(tmp_path / "cache")))
    assert not longer.cache_hit and longer.train.get(torch.tensor([0])).shape == (1, 33)
    # the split is not part of the key: another val_fraction reuses the packed rows
    resplit = build_datasets(DataConfig(source=str(path), seq_len=16, val_fraction=0.5,
                                        cache_dir=str(tmp_path / "cache")))
    assert resplit.cache_hit and len(resplit.val) == round(0.5 * len(resplit.train.tokens))


def test_publish_dir_is_atomic_and_first_writer_wins(tmp_path: Path) -> None:
    final = tmp_path / "packed" / "key"

    def broken(tmp: Path) -> None:
        (tmp / "half.npy").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        publish_dir(final, broken)
    assert not final.exists() and os.listdir(tmp_path / "packed") == []
    assert publish_dir(final, lambda tmp: (tmp / "a.txt").write_text("first"))
    assert not publish_dir(final, lambda tmp: (tmp / "a.txt").write_text("second"))
    assert (final / "a.txt").read_text() == "first"
    assert os.listdir(tmp_path / "packed") == ["key"]  # no temporary left behind


def test_publish_file_first_writer_wins(tmp_path: Path) -> None:
    target = tmp_path / "tok" / "bpe.json"
    assert publish_file(target, b"one")
    assert not publish_file(target, b"two")
    assert target.read_bytes() == b"one" and os.listdir(target.parent) == ["bpe.json"]


def test_cache_root_default_and_expansion(tmp_path: Path) -> None:
    assert cache_root("") == Path("~/.cache/moe_dist").expanduser().resolve()
    assert cache_root(str(tmp_path / "c")) == (tmp_path / "c").resolve()


def test_cache_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match=r"data.cache_dir = '.*f': .*f is a file, not a directory; set data.cache_dir"):
        cache_root(str(tmp_path / "f"))
    with pytest.raises(DataError, match=r"data.cache_dir = '.*sub': .*sub lies below .*f, which is a file"):
        cache_root(str(tmp_path / "f" / "sub"))


def test_full_disk_while_publishing_names_the_entry_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    def disk_full(directory: Path) -> None:
        (directory / "tokens.npy").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write the data cache entry abc: No space left on device") as info:
        publish_dir(tmp_path / "packed" / "abc", disk_full)
    assert info.value.errno == errno.ENOSPC and info.value.filename is not None
    assert list((tmp_path / "packed").iterdir()) == []
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if ".tmp-" in self.name:
            real(self, data[:1])  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OSError, match=r"cannot write the data cache file tok.json: No space left"):
        publish_file(tmp_path / "tok.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["packed"]


def test_unreadable_cache_entry_says_to_delete_it(tmp_path: Path) -> None:
    (tmp_path / "richard.txt").write_text(TEXT)
    entry = build_datasets(_cfg(tmp_path)).cache_path
    (entry / "tokens.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"cache entry .* is unreadable.*delete that directory"):
        build_datasets(_cfg(tmp_path))
