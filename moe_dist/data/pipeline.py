"""``build_datasets(cfg.data)``: source -> tokenizer -> packed rows (cached) -> train/val split.

Steps:

1. resolve ``data.source`` (paths and their size/mtime only; nothing is loaded yet) and check that
   the tokenizer fits the source (:func:`check_data` does this and loads a Hugging Face tokenizer;
   the trainer runs it on every rank before any process group exists);
2. get the tokenizer ('byte', a BPE trained on the documents and cached, a Hugging Face tokenizer,
   or 'none');
3. look up the packed rows under ``<cache>/packed/<key>``, key = hash(source identity,
   text_field, max_documents, seq_len, tokenizer fingerprint). On a miss: load the documents,
   tokenise, pack (see packing.py) and publish ``tokens.npy`` + ``meta.json`` atomically;
4. memory-map ``tokens.npy`` and split its rows into train and validation (a pure function of
   data.val_fraction and data.seed, computed on every start).

A warm start (cache hit, byte tokenizer or cached BPE) does steps 1, 3 and 4 without touching the
text: no ``load_dataset``, no tokenisation.

Pretokenized data (``data.source = 'megatron:PATH_PREFIX'``, megatron.py) skips tokenisation: its
``.bin`` is memory-mapped as the token stream and cut into rows in place; the cache holds only what
a scan of it found (token count, id range). ``data.tokenizer`` then names the tokenizer that wrote
the ids (every id must lie in its vocabulary), or is 'none' with the vocabulary from
model.vocab_size.
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
from moe_dist.data.hf_tokenizer import HFTokenizer
from moe_dist.data.megatron import scan_megatron, token_stream
from moe_dist.data.packing import pack_rows, split_rows, tokenize_stream
from moe_dist.data.sources import SourceSpec, load_documents, resolve_source
from moe_dist.data.tokenizer import (BUILTIN_TOKENIZERS, NONE_NEEDS_VOCAB, ByteTokenizer, TextTokenizer,
                                     build_tokenizer)

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


def check_data(cfg: DataConfig, model_vocab_size: int = 0) -> None:
    """What can be checked without reading the data, cheaply enough for every rank before any
    process group exists: ``data.source`` exists, ``data.tokenizer`` fits it, a Hugging Face
    tokenizer loads (offline, a hub name must be in the Hugging Face cache), and a set
    `model_vocab_size` (model.vocab_size; 0 = from the tokenizer) holds the tokenizer's ids."""
    _check_fit(cfg, resolve_source(cfg), model_vocab_size)
    vocab = None
    if cfg.tokenizer == "byte":
        vocab = ByteTokenizer.vocab_size
    elif cfg.tokenizer not in BUILTIN_TOKENIZERS:
        vocab = HFTokenizer(cfg.tokenizer).vocab_size
    # (a BPE's size is known once it is trained: the trainer checks it then)
    if vocab is not None and 0 < model_vocab_size < vocab:
        raise DataError(f"model.vocab_size ({model_vocab_size}) is smaller than the vocabulary of data.tokenizer = "
                        f"{cfg.tokenizer!r} ({vocab}); set model.vocab_size=0 to take it from the tokenizer, "
                        f"or to at least {vocab}")


def _check_fit(cfg: DataConfig, spec: SourceSpec, model_vocab_size: int) -> None:
    pretokenized = spec.kind == "megatron"
    if cfg.tokenizer == "none" and not pretokenized:
        raise DataError(f"data.tokenizer = 'none' works only with pretokenized data (data.source = "
                        f"'megatron:PATH_PREFIX'), not with data.source = {cfg.source!r}; set data.tokenizer "
                        "to 'byte', 'bpe' or a Hugging Face tokenizer")
    if cfg.tokenizer == "bpe" and pretokenized:
        raise DataError(f"data.tokenizer = 'bpe' trains a BPE on text, but data.source = {cfg.source!r} holds "
                        "token ids; set data.tokenizer to the tokenizer that wrote them (a Hugging Face "
                        "directory, tokenizer.json or hub name), or to 'none' with model.vocab_size")
    if cfg.tokenizer == "none" and model_vocab_size <= 0:
        raise DataError(NONE_NEEDS_VOCAB)


def build_datasets(cfg: DataConfig, model_vocab_size: int = 0) -> DataBundle:
    """Build (or load from the cache) the packed train and validation sequences of `cfg`.
    `model_vocab_size` (model.vocab_size, 0 = from the tokenizer) is read only by
    ``data.tokenizer: none``."""
    started = time.perf_counter()
    root = cache_root(cfg.cache_dir)
    spec = resolve_source(cfg)
    _check_fit(cfg, spec, model_vocab_size)
    if spec.kind == "megatron":
        return _build_pretokenized(cfg, spec, root, model_vocab_size, started)
    loaded: list[object] = []

    def documents() -> object:  # loads at most once, and only on a cache miss
        if not loaded:
            loaded.append(load_documents(spec, cfg, root / "hf"))
        return loaded[0]

    identity = spec.identity if spec.identity is not None else _hub_identity(spec, documents())
    tokenizer = build_tokenizer(cfg, identity, documents, root)
    if tokenizer.eod_id is None:
        raise DataError(f"data.tokenizer = {cfg.tokenizer!r} has no EOS token, which moe_dist puts between "
                        "documents; give the tokenizer one (tokenizer.add_special_tokens({'eos_token': ...}), "
                        "then save_pretrained) or use another tokenizer")
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
    return _bundle(cfg, tokenizer, _open_tokens(entry, cfg.seq_len), entry, hit, started)


def _build_pretokenized(cfg: DataConfig, spec: SourceSpec, root: Path, model_vocab_size: int,
                        started: float) -> DataBundle:
    """A Megatron .bin/.idx: the token stream is the mapped .bin, cut into rows in place."""
    def no_text() -> object:
        raise AssertionError("pretokenized data has no text to train a tokenizer on")  # check_data refuses bpe

    tokenizer = build_tokenizer(cfg, spec.identity, no_text, root, model_vocab_size)
    assert spec.path is not None
    entry, meta, hit = scan_megatron(spec.value, spec.path, spec.identity, cfg.max_documents, root)
    tokens = pack_rows(token_stream(spec.files[0], meta), cfg.seq_len, cfg.source)
    if meta["max_id"] >= tokenizer.vocab_size or meta["min_id"] < 0:
        given = ("model.vocab_size" if cfg.tokenizer == "none" else f"data.tokenizer = {cfg.tokenizer!r}")
        raise DataError(f"data.source = {cfg.source!r} holds token ids {meta['min_id']}..{meta['max_id']}, outside "
                        f"the vocabulary of {given} ({tokenizer.vocab_size} ids); set data.tokenizer to the "
                        "tokenizer that wrote the data (a Hugging Face directory or hub name), or "
                        f"data.tokenizer=none with model.vocab_size >= {meta['max_id'] + 1}")
    return _bundle(cfg, tokenizer, tokens, entry, hit, started)


def _bundle(cfg: DataConfig, tokenizer: TextTokenizer, tokens: np.ndarray, entry: Path, hit: bool,
            started: float) -> DataBundle:
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
