"""Hugging Face tokenizers: ``data.tokenizer`` set to a directory, a ``tokenizer.json`` or a hub name.

Where the value points (checked by :func:`locate_hf_tokenizer` without importing transformers,
so every rank can check it before any process group exists):

1. an existing directory: loaded with transformers' ``AutoTokenizer.from_pretrained`` (it must
   hold ``tokenizer.json`` or ``tokenizer_config.json``, as ``save_pretrained`` writes them);
2. an existing ``.json`` file: a ``tokenizers`` file, loaded with ``tokenizers.Tokenizer``
   (no transformers needed); its end-of-document token is the first of :data:`EOS_CANDIDATES`
   that it holds as a special token;
3. otherwise a hub name (``gpt2``, ``org/name``): ``AutoTokenizer`` finds it in the Hugging Face
   hub cache (``HF_HUB_CACHE``). Offline (``HF_HUB_OFFLINE=1``) a name that is not cached is a
   :class:`DataError` naming the key, the value and the fix; online, transformers downloads it.

Encoding matches what the tokenizer does by default (``add_special_tokens=True``: a BOS where the
tokenizer adds one), and the packer then appends the EOS as the document separator; an EOS that
the tokenizer appends itself is dropped first, so every document ends with exactly one.
The vocabulary is ``len(tokenizer)`` (added tokens included). The fingerprint (part of the data
cache key) hashes the tokenizer's saved files, not its path: the same tokenizer copied elsewhere
reuses the cache, a different one gets its own entry.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

from moe_dist.data.errors import DataError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""End-of-document tokens looked for in a bare tokenizer.json (GPT-2/NeoX, Llama-2/Mistral/T5,
Llama-3, Gemma), in this order."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HF_EXTRA = "pip install -e '.[hf]' (scripts/install.sh installs it)"


def locate_hf_tokenizer(value: str) -> Path | str:
    """The directory or file `value` names, or the hub name itself when it is cached (or the hub
    may be asked). A DataError when none of these holds."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise DataError(f"data.tokenizer = {value!r} is a directory without tokenizer.json or "
                            "tokenizer_config.json; point it at a directory written by "
                            "tokenizer.save_pretrained(DIR), or at a tokenizer.json file")
        return path
    if path.is_file():
        if path.suffix != ".json":
            raise DataError(f"data.tokenizer = {value!r} is a file but not a tokenizers .json file; "
                            "point it at a tokenizer.json, or at the directory that holds the "
                            "tokenizer files")
        return path
    if not _HUB_NAME.match(value):
        raise DataError(f"data.tokenizer = {value!r}: no such file or directory ({path.resolve()}); use "
                        "'byte', 'bpe', a tokenizer directory, a tokenizer.json or a hub name such as 'gpt2'")
    from huggingface_hub import constants, try_to_load_from_cache

    for name in ("tokenizer_config.json", "tokenizer.json"):
        if isinstance(try_to_load_from_cache(value, name), str):
            return value
    if constants.HF_HUB_OFFLINE:
        raise DataError(
            f"data.tokenizer = {value!r} is not a local path and not in the Hugging Face hub cache "
            f"({constants.HF_HUB_CACHE}), and the hub is offline (HF_HUB_OFFLINE=1); download it "
            f"where the hub is reachable (hf download {value}, or AutoTokenizer.from_pretrained("
            f"{value!r}).save_pretrained(DIR) and set data.tokenizer=DIR), or unset HF_HUB_OFFLINE")
    return value


class HFTokenizer:
    """A Hugging Face tokenizer behind moe_dist's :class:`~moe_dist.data.tokenizer.TextTokenizer`
    interface. `eod_id` is the tokenizer's EOS id (None when it has none)."""

    def __init__(self, value: str) -> None:
        location = locate_hf_tokenizer(value)
        self.name = value
        if isinstance(location, Path) and location.is_file():
            self._tok, self._fast = None, _load_tokenizers_file(value, location)
            self.vocab_size: int = self._fast.get_vocab_size(with_added_tokens=True)
            self.eod_id: int | None = next((self._fast.token_to_id(t) for t in EOS_CANDIDATES
                                            if self._fast.token_to_id(t) is not None), None)
            files = {"tokenizer.json": location.read_bytes()}
        else:
            self._tok, self._fast = _load_auto_tokenizer(value, location), None
            self.vocab_size = len(self._tok)
            self.eod_id = self._tok.eos_token_id
            files = _saved_files(self._tok)
        digest = hashlib.sha256(_library_versions().encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name] + b"\0")
        self.fingerprint = "hf-" + digest.hexdigest()[:20]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [enc.ids for enc in self._fast.encode_batch(texts)]
        # verbose=False: documents longer than model_max_length are expected here, they are packed.
        return self._tok(texts, add_special_tokens=True, verbose=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text with the tokenizer's own special tokens, less a trailing EOS (the
        packer appends exactly one)."""
        batch = self._ids(texts)
        if self.eod_id is not None:
            batch = [ids[:-1] if ids and ids[-1] == self.eod_id else ids for ids in batch]
        return batch

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, out_dir: Path) -> None:
        """Write the tokenizer files into `out_dir` (``save_pretrained``, or the tokenizer.json)."""
        if self._fast is not None:
            self._fast.save(str(Path(out_dir) / "tokenizer.json"))
        else:
            self._tok.save_pretrained(str(out_dir))


def _library_versions() -> str:
    """Versions that can change how the same files encode (part of the fingerprint)."""
    import importlib.metadata

    versions = []
    for package in ("tokenizers", "transformers"):
        try:
            versions.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    return ",".join(versions)


def _load_tokenizers_file(value: str, path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises a bare Exception on a bad file
        raise DataError(f"data.tokenizer = {value!r}: {path} is not a tokenizers file ({exc}); point it "
                        "at a tokenizer.json written by tokenizers or transformers") from exc


def _load_auto_tokenizer(value: str, location: Path | str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ModuleNotFoundError as exc:
        raise DataError(f"data.tokenizer = {value!r} needs transformers, which is not installed: "
                        f"{_HF_EXTRA}; or point data.tokenizer at a tokenizer.json file") from exc
    try:
        return AutoTokenizer.from_pretrained(str(location))
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:400]
        raise DataError(f"data.tokenizer = {value!r}: AutoTokenizer cannot load it ({type(exc).__name__}: "
                        f"{reason}); point data.tokenizer at a directory written by save_pretrained, a "
                        "tokenizer.json, or a hub name in the Hugging Face cache") from exc


_LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
"""Keys save_pretrained writes into tokenizer_config.json about how it was loaded, not what it is."""


def _saved_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for `tokenizer`, less how it was loaded: its content,
    whatever its path and whether it came from a directory or the hub cache."""
    with tempfile.TemporaryDirectory(prefix="moe_dist_tok_") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    if "tokenizer_config.json" in files:
        config = json.loads(files["tokenizer_config.json"])
        for key in _LOAD_KEYS:
            config.pop(key, None)
        files["tokenizer_config.json"] = json.dumps(config, sort_keys=True).encode()
    return files
