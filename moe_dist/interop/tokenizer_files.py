"""The run's tokenizer as Hugging Face tokenizer files (``tokenizer.json`` for the ``tokenizers``
library + ``tokenizer_config.json``), so ``AutoTokenizer.from_pretrained`` encodes exactly as
moe_dist did.

* ``byte``: a byte-level BPE without merges whose vocabulary maps byte b to id b: the ByteLevel
  pre-tokenizer turns each UTF-8 byte into one printable character (GPT-2's byte-to-unicode
  table, rebuilt below) and the model looks that character up. The end of document is id 0
  (the NUL byte), as in ``moe_dist.data.tokenizer``.
* ``bpe``: the run's own ``tokenizer.json`` (trained by moe_dist with the ``tokenizers``
  library), copied; ``<|endoftext|>`` (id 0) is the end of document.
* a Hugging Face tokenizer (``data.tokenizer`` = directory, tokenizer.json or hub name): saved
  as it is (``save_pretrained``, or its tokenizer.json); its EOS is the end of document.
* ``none`` (pretokenized ids): no tokenizer files; the user adds the one that wrote the data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from moe_dist.data.hf_tokenizer import HFTokenizer
from moe_dist.data.tokenizer import BPE_EOD_TOKEN, EOD_ID

logger = logging.getLogger(__name__)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def write_tokenizer(out_dir: Path, kind: str, max_seq_len: int, bpe_file: Path | None = None) -> int | None:
    """Write the tokenizer files for ``data.tokenizer`` = ``kind`` (a BPE needs its ``bpe_file``);
    returns the end-of-document id (None: no tokenizer, or one without an EOS)."""
    if kind == "none":
        logger.warning("data.tokenizer=none: the run trained on pretokenized ids, so no tokenizer files are "
                       "written; save the tokenizer that wrote the data into %s", out_dir)
        return None
    if kind not in ("byte", "bpe"):
        tokenizer = HFTokenizer(kind)
        tokenizer.save(out_dir)
        return tokenizer.eod_id
    if kind == "byte":
        text, eos = byte_tokenizer_json(), None
    else:
        assert bpe_file is not None, "a BPE tokenizer is exported from its file"
        text, eos = Path(bpe_file).read_text(encoding="utf-8"), BPE_EOD_TOKEN
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False}
    if eos is not None:
        config.update(eos_token=eos, pad_token=eos)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return EOD_ID
