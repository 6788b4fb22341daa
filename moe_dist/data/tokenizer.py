"""Tokenisers: UTF-8 bytes, a byte-level BPE trained locally with ``tokenizers``, or any Hugging
Face tokenizer (``hf_tokenizer.py``); 'none' for pretokenized Megatron data.

All share one small interface (:class:`TextTokenizer`): ``encode(str) -> list[int]``,
``decode(ids) -> str``, ``vocab_size``, plus ``eod_id`` (the end-of-document separator),
``encode_batch`` for ``Dataset.map`` and ``fingerprint`` (keys the packed-data cache).

End of document: token id 0 in both tokenisers. For 'byte' it is the NUL byte (id = byte value, so
the vocabulary stays exactly 256 and decoding stays exact; NUL does not occur in ordinary text);
for 'bpe' it is the special token ``<|endoftext|>``, which the trainer puts first (id 0). The text
``<|endoftext|>`` inside a document is therefore read as a document boundary by the BPE. A
Hugging Face tokenizer separates documents with its own EOS token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from moe_dist.config import DataConfig
from moe_dist.data.cache import fingerprint, publish_file
from moe_dist.data.errors import DataError
from moe_dist.data.hf_tokenizer import HFTokenizer

logger = logging.getLogger(__name__)

EOD_ID = 0
BPE_EOD_TOKEN = "<|endoftext|>"
BUILTIN_TOKENIZERS = ("byte", "bpe", "none")
"""Values of data.tokenizer that name no Hugging Face tokenizer."""
_BPE_FORMAT = 1  # bump when the BPE recipe below changes


class TextTokenizer(Protocol):
    """What the data pipeline, the trainer and sampling scripts rely on."""

    name: str
    vocab_size: int
    eod_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; vocabulary 256; ``decode(encode(s)) == s`` for every string."""

    name = "byte"
    vocab_size = 256
    eod_id = EOD_ID
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace": a slice that cuts a multi-byte character still decodes.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


class BPETokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) loaded from a ``tokenizer.json``."""

    name = "bpe"
    eod_id = EOD_ID

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        text = path.read_text(encoding="utf-8")
        self._tok = Tokenizer.from_str(text)
        if self._tok.token_to_id(BPE_EOD_TOKEN) != EOD_ID:
            raise ValueError(f"BPE file {path} does not map {BPE_EOD_TOKEN} to id {EOD_ID}; "
                             "delete it so that it is retrained")
        self.vocab_size: int = self._tok.get_vocab_size()
        self.fingerprint = "bpe-" + fingerprint(text)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts)]


def train_bpe(texts: Iterator[list[str]], vocab_size: int) -> str:
    """Train a byte-level BPE on batches of texts; returns the serialised ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


class IdsOnly:
    """``data.tokenizer: none``: pretokenized ids used as they are; the vocabulary is
    model.vocab_size. Nothing to encode with; ``decode`` writes the ids as numbers."""

    name = "none"
    eod_id = None
    fingerprint = "none"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise DataError("data.tokenizer = 'none' cannot encode text; name the tokenizer that wrote the "
                        "data in data.tokenizer")

    encode_batch = encode  # type: ignore[assignment]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def nominal_vocab_size(cfg: DataConfig, model_vocab_size: int = 0) -> int:
    """The vocabulary ``data.tokenizer`` gives, without reading any data (for estimates): 256,
    data.bpe_vocab_size (an upper bound: a BPE can come out smaller), the Hugging Face
    tokenizer's, or model_vocab_size for 'none'."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if cfg.tokenizer == "bpe":
        return cfg.bpe_vocab_size
    if cfg.tokenizer == "none":
        if model_vocab_size <= 0:
            raise DataError(NONE_NEEDS_VOCAB)
        return model_vocab_size
    return HFTokenizer(cfg.tokenizer).vocab_size


NONE_NEEDS_VOCAB = ("data.tokenizer = 'none' takes the vocabulary from model.vocab_size, which is 0; set "
                    "model.vocab_size to the vocabulary the ids come from (at least the largest id + 1), "
                    "or set data.tokenizer to the tokenizer that wrote the data")


def build_tokenizer(cfg: DataConfig, source_identity: Any, documents: Callable[[], Any],
                    cache_root: Path, model_vocab_size: int = 0) -> TextTokenizer:
    """The tokenizer ``data.tokenizer`` asks for. A BPE is trained on `documents()` (a Dataset
    with a 'text' column, loaded only on a cache miss) and cached under
    ``<cache_root>/tokenizers/`` by source identity and settings, so later runs reuse it.
    'none' (pretokenized data only) takes its vocabulary from `model_vocab_size`."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "none":
        if model_vocab_size <= 0:
            raise DataError(NONE_NEEDS_VOCAB)
        return IdsOnly(model_vocab_size)
    if cfg.tokenizer != "bpe":
        return HFTokenizer(cfg.tokenizer)
    import tokenizers

    key = fingerprint({"format": _BPE_FORMAT, "source": source_identity,
                       "text_field": cfg.text_field, "max_documents": cfg.max_documents,
                       "vocab_size": cfg.bpe_vocab_size, "tokenizers": tokenizers.__version__})
    path = cache_root / "tokenizers" / f"bpe-{key}.json"
    if not path.is_file():
        dataset = documents()
        batch = 1000
        texts = (dataset[i: i + batch]["text"] for i in range(0, len(dataset), batch))
        logger.info("training a %d-token BPE on %d documents", cfg.bpe_vocab_size, len(dataset))
        publish_file(path, train_bpe(texts, cfg.bpe_vocab_size).encode("utf-8"))
    # Read back what was published: if several ranks trained at once, all use the winner's file.
    return BPETokenizer(path)
