"""Tokenise documents, concatenate them into one stream and cut it into fixed-length rows.

Layout of the packed array ``tokens[N, seq_len + 1]`` (legend: N packed sequences, L = seq_len):

1. every document is tokenised (``Dataset.map(batched=True)``) and followed by the tokenizer's
   end-of-document id: ``doc_0 EOD doc_1 EOD ... doc_n EOD``;
2. the stream is cut into consecutive, non-overlapping rows of L + 1 tokens; the last partial
   row is dropped. Row i holds stream[i*(L+1) : (i+1)*(L+1)]: its inputs are row[:-1] and its
   targets row[1:], the same tokens shifted by one. Rows cross document boundaries (the EOD
   marks them); rows share no token, so a train and a validation row never overlap;
3. :func:`split_rows` holds out a deterministic random subset of rows for validation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import TextTokenizer


def storage_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id (uint16 up to 65,536 tokens)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def tokenize_stream(documents: Any, tokenizer: TextTokenizer, fingerprint: str) -> np.ndarray:
    """All documents of a Dataset ('text' column) as one token stream, each followed by EOD."""
    eod = tokenizer.eod_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        return {"ids": [np.append(np.asarray(ids, dtype=np.int32), np.int32(eod))
                        for ids in tokenizer.encode_batch(batch["text"])]}

    # keep_in_memory: the result is cached by us as packed rows, not as Arrow map caches.
    # new_fingerprint: skips hashing the (unpicklable) Rust tokenizer inside `encode`.
    encoded = documents.map(encode, batched=True, batch_size=64, remove_columns=["text"],
                            keep_in_memory=True, new_fingerprint=fingerprint,
                            desc=f"tokenise ({tokenizer.name})")
    column = encoded.data.column("ids").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(
        storage_dtype(tokenizer.vocab_size), copy=False)


def pack_rows(stream: np.ndarray, seq_len: int, source: str) -> np.ndarray:
    """Cut `stream` into rows of seq_len + 1 tokens; DataError unless that gives >= 2 rows."""
    width = seq_len + 1
    num_rows = len(stream) // width
    if num_rows < 2:
        raise DataError(
            f"data.source = {source!r} gives {len(stream)} tokens, which pack into {num_rows} "
            f"sequence(s) of data.seq_len + 1 = {width} tokens; a train/validation split needs "
            "at least 2; lower data.seq_len, raise data.max_documents (0 = all) or add text")
    return stream[: num_rows * width].reshape(num_rows, width)


def split_rows(num_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train_rows, val_rows), each sorted: round(val_fraction * N) rows, at least one,
    drawn with ``torch.randperm`` from a generator seeded with `seed`; every other row trains.
    A pure function of its arguments, so every rank and every resumed run agrees."""
    num_val = max(1, round(val_fraction * num_rows))
    if num_val >= num_rows:
        raise DataError(f"data.val_fraction = {val_fraction} of {num_rows} packed sequences leaves "
                        "none for training; lower data.val_fraction or provide more text")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_rows, generator=generator).numpy()
    return np.sort(order[num_val:]), np.sort(order[:num_val])
