"""``build_datasets(cfg.data)``: source -> tokenizer -> packed rows (cached) -> train/val split.

Steps:

1. resolve ``data.source`` (paths and their size/mtime only; nothing is loaded yet);
2. get the tokenizer ('byte', or a BPE trained on the documents and cached);
3. look up the packed rows under ``<cache>/packed/<key>``, key = hash(source identity,
   text_field, max_documents, seq_len, tokenizer fingerprint). On a miss: load the documents,
   tokenise, pack (see packing.py) and publish ``tokens.npy`` + ``meta.json`` atomically;
4. memory-map ``tokens.npy`` and split its rows into train and validation (a pure function of
   data.val_fraction and data.seed, computed on every start).

A warm start (cache hit, byte tokenizer or cached BPE) does steps 1, 3 and 4 without touching the
text: no ``load_dataset``, no tokenisation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_dist.config import DataConfig
from moe_dist.data.cache import cache_root, fingerprint, publish_dir
from moe_dist.data.errors import DataError
from moe_dist.data.packing import pack_rows, split_rows, tokenize_stream
from moe_dist.data.sources import SourceSpec, load_documents, resolve_source
from moe_dist.data.tokenizer import TextTokenizer, build_tokenizer

logger = logging.getLogger(__name__)

_PACK_FORMAT = 1  # bump when packing.py changes what a cache entry holds
TOKENS_FILE = "tokens.npy"
META_FILE = "meta.json"


class PackedSequences:
    """A split (train or validation) of packed rows: ``len()`` rows of seq_len + 1 tokens.

    `tokens` is the whole packed array [N, seq_len + 1] (usually memory-mapped); `rows` are the
    row numbers belonging to this split. Index i of the split is row ``rows[i]``.
    """

    def __init__(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        self.tokens = tokens
        self.rows = np.asarray(rows, dtype=np.int64)
        self.seq_len = tokens.shape[1] - 1

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at split positions `indices` (LongTensor[B]) as int64 LongTensor[B, seq_len+1];
        inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.rows)):
            raise IndexError(f"indices must lie in [0, {len(self.rows)}); got "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        batch = np.asarray(self.tokens[self.rows[idx]], dtype=np.int64)  # [B, L+1]
        return torch.from_numpy(batch)


@dataclass
class DataBundle:
    """Everything the trainer needs from the data pipeline."""

    tokenizer: TextTokenizer
    vocab_size: int
    train: PackedSequences
    val: PackedSequences
    cache_path: Path
    """Directory of the packed cache entry in use."""
    cache_hit: bool
    """True when the packed rows came from the cache (no tokenisation in this call)."""


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Build (or load from the cache) the packed train and validation sequences of `cfg`."""
    started = time.perf_counter()
    root = cache_root(cfg.cache_dir)
    spec = resolve_source(cfg)
    loaded: list[object] = []

    def documents() -> object:  # loads at most once, and only on a cache miss
        if not loaded:
            loaded.append(load_documents(spec, cfg, root / "hf"))
        return loaded[0]

    identity = spec.identity if spec.identity is not None else _hub_identity(spec, documents())
    tokenizer = build_tokenizer(cfg, identity, documents, root)
    key = fingerprint({"format": _PACK_FORMAT, "source": identity, "text_field": cfg.text_field,
                       "max_documents": cfg.max_documents, "seq_len": cfg.seq_len,
                       "tokenizer": tokenizer.fingerprint})
    entry = root / "packed" / key
    hit = (entry / META_FILE).is_file()
    if not hit:
        stream = tokenize_stream(documents(), tokenizer, key)
        rows = pack_rows(stream, cfg.seq_len, cfg.source)
        meta = {"source": cfg.source, "identity": identity, "text_field": cfg.text_field,
                "max_documents": cfg.max_documents, "seq_len": cfg.seq_len,
                "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "num_tokens": int(len(stream)), "shape": list(rows.shape)}

        def write(tmp: Path) -> None:
            np.save(tmp / TOKENS_FILE, rows)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))

        publish_dir(entry, write)
    tokens = _open_tokens(entry, cfg.seq_len)
    train_rows, val_rows = split_rows(len(tokens), cfg.val_fraction, cfg.seed)
    logger.info("data: %d train + %d val sequences of %d tokens, vocab %d (%s, %.2fs, cache %s)",
                len(train_rows), len(val_rows), cfg.seq_len + 1, tokenizer.vocab_size,
                "hit" if hit else "built", time.perf_counter() - started, entry)
    return DataBundle(tokenizer=tokenizer, vocab_size=tokenizer.vocab_size,
                      train=PackedSequences(tokens, train_rows),
                      val=PackedSequences(tokens, val_rows), cache_path=entry, cache_hit=hit)


def _hub_identity(spec: SourceSpec, documents: object) -> list[object]:
    """A hub dataset is recognised by its name and the fingerprint datasets gives its files."""
    return [spec.hub_name, getattr(documents, "_fingerprint", None), len(documents)]  # type: ignore[arg-type]


def _open_tokens(entry: Path, seq_len: int) -> np.ndarray:
    path = entry / TOKENS_FILE
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"the data cache entry {entry} is unreadable ({exc}); delete that "
                        "directory (or set data.cache_dir elsewhere) to rebuild it") from exc
    if tokens.ndim != 2 or tokens.shape[1] != seq_len + 1:
        raise DataError(f"the data cache entry {entry} holds shape {tokens.shape}, expected "
                        f"[N, {seq_len + 1}]; delete that directory to rebuild it")
    return tokens
