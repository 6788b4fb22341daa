"""``data.source = 'megatron:PATH_PREFIX'``: Megatron's pretokenized ``PATH_PREFIX.bin/.idx``.

The pair is what Megatron-LM's ``tools/preprocess_data.py`` writes (and megatron-core's
``IndexedDatasetBuilder``): the ``.bin`` holds every document's token ids back to back, the
``.idx`` their dtype, sequence lengths, byte offsets and document boundaries. moe_dist reads
it as follows:

1. :func:`megatron_paths` checks that both files exist (no import, so every rank can check
   it before any process group exists).
2. On a cache miss, :func:`scan_megatron` opens the index with megatron-core's own
   ``IndexedDataset`` (imported here only: importing megatron.core takes seconds), checks that the
   sequences lie back to back from byte 0 (as the builder writes them), counts the tokens of the
   first ``data.max_documents`` documents, reads the smallest and largest id, and compares the
   first and last document as ``IndexedDataset`` returns them with the mapped file. The result is
   cached as ``<cache>/megatron/<key>/meta.json``, key = hash(file path, size, mtime,
   max_documents).
3. :func:`token_stream` memory-maps the ``.bin`` as one stream of those tokens, so nothing is
   copied: packing cuts it into rows of seq_len + 1 (``packing.pack_rows``), ranks share the pages.

The ids are used as stored. No end-of-document token is added: Megatron's GPT datasets rely on
``preprocess_data.py --append-eod`` having put one after every document, and so does moe_dist.
(The token arrays ``IndexedDataset`` hands out are views of an mmap that its destructor closes;
one that outlives the dataset crashes the process, hence our own read-only map of the file.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moe_dist.data.cache import fingerprint, publish_dir
from moe_dist.data.errors import DataError

logger = logging.getLogger(__name__)

MEGATRON_PREFIX = "megatron:"
_SCAN_FORMAT = 1  # bump when meta.json below changes
_CHUNK = 1 << 26  # tokens per min/max pass


def megatron_paths(value: str) -> tuple[Path, Path]:
    """(PATH_PREFIX.bin, PATH_PREFIX.idx) of ``data.source = value``; a DataError if either is
    missing. A prefix given with its .bin/.idx suffix is accepted."""
    prefix = value[len(MEGATRON_PREFIX):].strip()
    for suffix in (".bin", ".idx"):
        prefix = prefix.removesuffix(suffix)
    if not prefix:
        raise DataError(f"data.source = {value!r} names no dataset; write 'megatron:PATH_PREFIX' "
                        "for PATH_PREFIX.bin and PATH_PREFIX.idx (Megatron's --data-path)")
    base = Path(prefix).expanduser()
    bin_path, idx_path = Path(f"{base}.bin"), Path(f"{base}.idx")
    missing = [p for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        raise DataError(f"data.source = {value!r}: no {' and no '.join(str(p.resolve()) for p in missing)}; "
                        "PATH_PREFIX is the path of the .bin/.idx pair without its suffix, as written by "
                        "Megatron-LM's tools/preprocess_data.py (--output-prefix plus '_text_document')")
    return bin_path, idx_path


def scan_megatron(value: str, prefix: Path, identity: Any, max_documents: int,
                  root: Path) -> tuple[Path, dict, bool]:
    """(cache entry, meta, cache hit) of the dataset at `prefix`; meta holds its dtype, document and
    token counts and id range. Read from the cache when present, else computed with megatron-core
    (see the module docstring)."""
    key = fingerprint({"format": _SCAN_FORMAT, "source": identity, "max_documents": max_documents})
    entry = root / "megatron" / key
    meta_path = entry / "meta.json"
    hit = meta_path.is_file()
    if not hit:
        meta = _scan(value, prefix, max_documents)
        publish_dir(entry, lambda tmp: (tmp / "meta.json").write_text(json.dumps(meta, indent=1)))
    return entry, json.loads(meta_path.read_text()), hit


def token_stream(bin_path: Path, meta: dict) -> np.ndarray:
    """The first ``meta['num_tokens']`` ids of `bin_path`, memory-mapped read-only (no copy)."""
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))


_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER


def _open_indexed_dataset(value: str, prefix: Path) -> Any:
    with open(f"{prefix}.idx", "rb") as idx:
        # Checked before IndexedDataset sees it: its destructor raises on an index it failed to open.
        if idx.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
            raise DataError(f"data.source = {value!r}: {prefix}.idx is not a Megatron index (it does not start "
                            f"with {_INDEX_HEADER!r}); point data.source at the prefix of a .bin/.idx pair "
                            "written by IndexedDatasetBuilder / preprocess_data.py")
    with _quiet_megatron():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        try:
            return IndexedDataset(str(prefix), mmap=True)
        except (AssertionError, ValueError, struct.error) as exc:
            raise DataError(f"data.source = {value!r}: megatron-core cannot read {prefix}.idx ({type(exc).__name__}: "
                            f"{exc}); it must be an index written by IndexedDatasetBuilder / preprocess_data.py, "
                            "beside its .bin") from exc


@contextlib.contextmanager
def _quiet_megatron() -> Iterator[None]:
    """Importing megatron.core warns that Apex and Transformer Engine are missing and logs its FSDP
    set-up, IndexedDataset logs six lines per index: none of it concerns this use. Our own line
    (in _scan) says what was read."""
    megatron_logger = logging.getLogger("megatron")
    level = megatron_logger.level
    megatron_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        megatron_logger.setLevel(level)


def _scan(value: str, prefix: Path, max_documents: int) -> dict:
    dataset = _open_indexed_dataset(value, prefix)
    try:
        dtype = np.dtype(dataset.index.dtype)
        lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # copies: the index mmap closes with `dataset`
        pointers = np.array(dataset.index.sequence_pointers, dtype=np.int64)
        doc_bounds = np.array(dataset.document_indices, dtype=np.int64)  # [docs + 1] sequence indices
        num_docs = len(doc_bounds) - 1
        if len(lengths) == 0 or num_docs < 1 or doc_bounds[1] < 1:
            raise DataError(f"data.source = {value!r} holds no documents; point it at a non-empty dataset")
        starts = np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize
        bin_size = Path(f"{prefix}.bin").stat().st_size
        if not np.array_equal(pointers, starts) or bin_size != int(lengths.sum()) * dtype.itemsize:
            raise DataError(f"data.source = {value!r}: the sequences in {prefix}.bin do not lie back to back "
                            "from byte 0 as the index describes them, which moe_dist needs to map the file "
                            "as one token stream; rewrite it with megatron-core's IndexedDatasetBuilder")
        used_docs = min(num_docs, max_documents) if max_documents else num_docs
        used_sequences = int(doc_bounds[used_docs])
        num_tokens = int(lengths[:used_sequences].sum())
        first = np.array(dataset[0], dtype=np.int64)
        last = np.array(dataset[used_sequences - 1], dtype=np.int64)
    finally:
        del dataset
    stream = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r", shape=(num_tokens,))
    end = int(lengths[:used_sequences - 1].sum())
    # A check that our map of the file reads what megatron-core reads.
    assert np.array_equal(stream[: len(first)], first) and np.array_equal(stream[end: end + len(last)], last)
    low, high = None, None
    for start in range(0, num_tokens, _CHUNK):
        chunk = stream[start: start + _CHUNK]
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
        high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
    logger.info("data.source %r: %d of %d documents, %d tokens (%s), ids %s..%s", value, used_docs,
                num_docs, num_tokens, dtype.name, low, high)
    return {"prefix": str(prefix.resolve()), "dtype": dtype.name, "num_documents": used_docs,
            "total_documents": num_docs, "num_sequences": used_sequences, "num_tokens": num_tokens,
            "min_id": low, "max_id": high}
