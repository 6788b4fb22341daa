"""Byte and BPE tokenisers: exact roundtrips, the EOD id, BPE training and its cache."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from moe_dist.config import DataConfig
from moe_dist.data import BPETokenizer, ByteTokenizer, build_datasets
from moe_dist.data.tokenizer import BPE_EOD_TOKEN, build_tokenizer

TRICKY = "Hé said: «naïve» \t\n  ☃ 😀 \x00 end  "

VERSE = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
         "Rough winds do shake the darling buds of May, And summer's lease hath all too short a "
         "date. ") * 6


def test_byte_tokenizer_is_utf8_bytes_and_roundtrips() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.eod_id == 0
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    ids = tok.encode(TRICKY)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(TRICKY.encode("utf-8"))
    assert tok.decode(ids) == TRICKY
    assert [a.tolist() for a in tok.encode_batch(["ab", ""])] == [[97, 98], []]


def _docs(*texts: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts)})


def test_bpe_trains_roundtrips_and_compresses(tmp_path: Path) -> None:
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path))
    tok = build_tokenizer(cfg, ["corpus-1"], lambda: _docs(VERSE, VERSE.upper()), tmp_path)
    assert isinstance(tok, BPETokenizer)
    assert 257 < tok.vocab_size <= 300  # 256 bytes + EOD + some merges
    assert tok.eod_id == 0 and tok.decode([0]) == BPE_EOD_TOKEN
    assert tok.decode(tok.encode(TRICKY)) == TRICKY  # unseen characters: byte fallback
    ids = tok.encode(VERSE)
    assert tok.decode(ids) == VERSE
    assert len(ids) < 0.8 * len(VERSE.encode("utf-8"))  # ~43 merges learned from the verse
    assert [list(x) for x in tok.encode_batch([VERSE[:40], "x"])] == [tok.encode(VERSE[:40]),
                                                                   tok.encode("x")]


def test_bpe_is_cached_by_source_and_settings(tmp_path: Path) -> None:
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=280, cache_dir=str(tmp_path))
    first = build_tokenizer(cfg, ["corpus-1"], lambda: _docs(VERSE), tmp_path)

    def no_load() -> datasets.Dataset:
        raise AssertionError("a cached BPE must not load the documents again")

    again = build_tokenizer(cfg, ["corpus-1"], no_load, tmp_path)
    assert again.path == first.path and again.fingerprint == first.fingerprint
    other_source = build_tokenizer(cfg, ["corpus-2"], lambda: _docs(VERSE), tmp_path)
    bigger = build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=290), ["corpus-1"],
                             lambda: _docs(VERSE), tmp_path)
    assert len({first.path, other_source.path, bigger.path}) == 3
    assert sorted(p.name.startswith("bpe-") for p in (tmp_path / "tokenizers").iterdir()) == [True] * 3


def test_bpe_pipeline_packs_bpe_ids(tmp_path: Path) -> None:
    path = tmp_path / "sonnet.txt"
    path.write_text(VERSE)
    cfg = DataConfig(source=str(path), tokenizer="bpe", bpe_vocab_size=300, seq_len=8,
                     cache_dir=str(tmp_path / "cache"))
    bundle = build_datasets(cfg)
    want = bundle.tokenizer.encode(VERSE) + [0]
    flat = bundle.train.tokens.reshape(-1).tolist()
    assert flat == want[: len(flat)] and len(want) - len(flat) < 9
    assert bundle.vocab_size == bundle.tokenizer.vocab_size <= 300


@pytest.mark.parametrize("bad", [[-1], [256]])
def test_byte_decode_rejects_out_of_range_ids(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        ByteTokenizer().decode(bad)
