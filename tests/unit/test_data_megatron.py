"""``data.source = 'megatron:PATH_PREFIX'``: datasets written here by megatron-core's own
``IndexedDatasetBuilder``, read back through ``IndexedDataset`` and packed without tokenisation."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig, load_config
from moe_dist.data import DataError, build_datasets, check_data
from tests.unit.tiny_tokenizer import CORPUS, save_tiny_tokenizer

with warnings.catch_warnings():  # megatron.core warns that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

EOD = 1


def write_megatron(prefix: Path, documents: list[list[int]], dtype=np.uint16, split: int = 0) -> Path:
    """What Megatron-LM's preprocess_data.py does per document: add its ids, end the document.
    `split` > 0 stores each document as sequences of at most that many tokens (--split-sentences)."""
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    for doc in documents:
        if split:
            builder.add_document(torch.tensor(doc), [len(doc[i: i + split]) for i in range(0, len(doc), split)])
        else:
            builder.add_item(torch.tensor(doc))
            builder.end_document()
    builder.finalize(get_idx_path(str(prefix)))
    return prefix


DOCS = [[5, 6, 7, 8, 9, EOD], [10, 11, EOD], [12, 13, 14, 15, 16, 17, 18, EOD], [19, 20, 21, EOD], [22, 23, 24, EOD]]
STREAM = [t for d in DOCS for t in d]  # 24 tokens


def _cfg(tmp_path: Path, prefix: Path, tokenizer: str = "none", **kw) -> DataConfig:
    settings = {"seq_len": 5, "val_fraction": 0.25, "cache_dir": str(tmp_path / "cache"), **kw}
    return DataConfig(source=f"megatron:{prefix}", tokenizer=tokenizer, **settings)


def _rows(bundle) -> list[list[int]]:
    return np.asarray(bundle.train.tokens).tolist()


def test_rows_are_the_stored_ids_cut_in_order_with_no_token_added(tmp_path):
    prefix = write_megatron(tmp_path / "corpus_text_document", DOCS)
    bundle = build_datasets(_cfg(tmp_path, prefix), model_vocab_size=64)
    assert _rows(bundle) == [STREAM[i: i + 6] for i in range(0, 24, 6)]  # seq_len + 1 = 6, 4 rows
    assert bundle.vocab_size == bundle.tokenizer.vocab_size == 64 and not bundle.cache_hit
    assert len(bundle.train) == 3 and len(bundle.val) == 1
    assert isinstance(bundle.train.tokens, np.memmap)  # the .bin itself, not a copy
    batch = bundle.train.get(torch.tensor([0, 2]))
    assert batch.dtype == torch.int64 and batch.shape == (2, 6)
    assert bundle.tokenizer.decode([5, 6]) == "5 6"


def test_a_warm_start_reads_only_the_cached_scan(tmp_path, monkeypatch):
    prefix = write_megatron(tmp_path / "d", DOCS)
    cold = build_datasets(_cfg(tmp_path, prefix), model_vocab_size=64)
    monkeypatch.setattr("moe_dist.data.megatron._scan", lambda *a: pytest.fail("rescanned"))
    warm = build_datasets(_cfg(tmp_path, prefix), model_vocab_size=64)
    assert warm.cache_hit and warm.cache_path == cold.cache_path and _rows(warm) == _rows(cold)
    assert cold.cache_path.parent == tmp_path / "cache" / "megatron"
    write_megatron(prefix, DOCS[:4])  # rewritten: a new size and mtime, so a new scan
    monkeypatch.undo()
    changed = build_datasets(_cfg(tmp_path, prefix), model_vocab_size=64)
    assert not changed.cache_hit and changed.cache_path != cold.cache_path


def test_max_documents_counts_documents_not_sequences(tmp_path):
    prefix = write_megatron(tmp_path / "split", DOCS, split=3)
    bundle = build_datasets(_cfg(tmp_path, prefix, max_documents=3, seq_len=3), model_vocab_size=64)
    first_three = STREAM[:17]  # 6 + 3 + 8 tokens, stored as 2 + 1 + 3 sequences
    assert np.asarray(bundle.train.tokens).reshape(-1).tolist() == first_three[:16]


def test_int32_ids_of_a_large_vocabulary(tmp_path):
    docs = [[70_000 + i for i in range(7)] + [EOD]] * 3
    prefix = write_megatron(tmp_path / "big", docs, dtype=np.int32)
    bundle = build_datasets(_cfg(tmp_path, prefix), model_vocab_size=70_010)
    assert np.asarray(bundle.train.tokens).dtype == np.int32 and int(bundle.train.get(torch.tensor([0])).max()) < 70_010


def test_the_tokenizer_that_wrote_the_ids_gives_the_vocabulary(tmp_path):
    tok_dir = save_tiny_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tok_dir)
    docs = [auto(text).input_ids + [auto.eos_token_id] for text in CORPUS]  # preprocess_data.py --append-eod
    prefix = write_megatron(tmp_path / "hf", docs)
    cfg = load_config(None, [f"data.source=megatron:{prefix}", f"data.tokenizer={tok_dir}", "data.seq_len=8",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    assert cfg.model.vocab_size == 0
    check_data(cfg.data, cfg.model.vocab_size)
    bundle = build_datasets(cfg.data, cfg.model.vocab_size)
    assert bundle.vocab_size == len(auto) == 300
    stream = np.asarray(bundle.train.tokens).reshape(-1).tolist()
    assert bundle.tokenizer.decode(stream).startswith(CORPUS[0] + "</s>" + CORPUS[1])


def test_a_prefix_given_with_its_suffix_is_accepted(tmp_path):
    prefix = write_megatron(tmp_path / "d", DOCS)
    bundle = build_datasets(_cfg(tmp_path, Path(f"{prefix}.bin")), model_vocab_size=64)
    assert _rows(bundle)[0] == STREAM[:6]


@pytest.mark.parametrize("tokenizer, vocab, message", [
    ("byte", 0, r"^data\.source = 'megatron:.*' holds token ids 1\.\.300, outside the vocabulary of data\.tokenizer = "
                r"'byte' \(256 ids\); set data\.tokenizer to the tokenizer that wrote the data \(a Hugging Face "
                r"directory or hub name\), or data\.tokenizer=none with model\.vocab_size >= 301$"),
    ("none", 300, r"outside the vocabulary of model\.vocab_size \(300 ids\)"),
    ("none", 0, r"^data\.tokenizer = 'none' takes the vocabulary from model\.vocab_size, which is 0; set "
                r"model\.vocab_size to the vocabulary the ids come from"),
    ("bpe", 0, r"^data\.tokenizer = 'bpe' trains a BPE on text, but data\.source = 'megatron:.*' holds token ids"),
])
def test_ids_outside_the_vocabulary_and_tokenizers_that_cannot_apply_are_refused(tmp_path, tokenizer, vocab, message):
    prefix = write_megatron(tmp_path / "d", [[1, 2, 300, 4, EOD]] * 4)
    with pytest.raises(DataError, match=message):
        build_datasets(_cfg(tmp_path, prefix, tokenizer=tokenizer), model_vocab_size=vocab)


def test_missing_files_fail_in_check_data_with_both_paths(tmp_path):
    with pytest.raises(DataError, match=r"^data\.source = 'megatron:.*/nope': no .*/nope\.bin and no .*/nope\.idx; "
                                        r"PATH_PREFIX is the path of the \.bin/\.idx pair without its suffix"):
        check_data(_cfg(tmp_path, tmp_path / "nope"), model_vocab_size=64)
    with pytest.raises(DataError, match=r"names no dataset; write 'megatron:PATH_PREFIX'"):
        check_data(DataConfig(source="megatron:", tokenizer="none"), model_vocab_size=64)


# megatron-core's IndexedDataset.__del__ raises on an index its __init__ failed to open (its bug).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_index_megatron_cannot_read_is_a_data_error(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"\0" * 8)
    (tmp_path / "bad.idx").write_bytes(b"not an index")
    with pytest.raises(DataError, match=r"bad\.idx is not a Megatron index \(it does not start with "):
        build_datasets(_cfg(tmp_path, tmp_path / "bad"), model_vocab_size=64)
    (tmp_path / "bad.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x02" + b"\0" * 7)  # a version megatron-core refuses
    with pytest.raises(DataError, match=r"megatron-core cannot read .*bad\.idx \(AssertionError: bad version"):
        build_datasets(_cfg(tmp_path, tmp_path / "bad"), model_vocab_size=64)


def test_a_bin_that_is_not_one_back_to_back_stream_is_refused(tmp_path):
    prefix = write_megatron(tmp_path / "d", DOCS)
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0\0")  # bytes the index does not describe
    with pytest.raises(DataError, match=r"the sequences in .*d\.bin do not lie back to back from byte 0 as the index "
                                        r"describes them"):
        build_datasets(_cfg(tmp_path, prefix), model_vocab_size=64)


def test_too_few_tokens_for_two_rows(tmp_path):
    prefix = write_megatron(tmp_path / "d", [[5, 6, EOD]])
    with pytest.raises(DataError, match=r"gives 3 tokens, which pack into 0 sequence\(s\)"):
        build_datasets(_cfg(tmp_path, prefix), model_vocab_size=64)


def test_moe_dist_imports_megatron_core_only_to_read_such_a_dataset():
    """Importing the data pipeline and the trainer does not import megatron.core (seconds of
    import and warnings on a CPU machine); data/megatron.py imports it inside a function."""
    import subprocess

    code = ("import sys, moe_dist.data, moe_dist.train.trainer; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
