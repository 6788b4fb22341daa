"""On-disk cache of tokenizers and packed datasets: keys, location, atomic writes.

Every cached artefact lives under ``<cache root>/<kind>/<key>`` where the key is a hash of
everything that determines its content (see :func:`fingerprint`). Writers build the artefact in
a private temporary path beside the final one and publish it with one atomic rename or link, so a
reader never sees a half-written entry, a killed writer leaves only a ``.tmp-*`` path behind, and
when several processes (data-parallel ranks) build the same entry at once the first one to
publish wins and the others read its result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from moe_dist.config.errors import with_path
from moe_dist.data.errors import DataError

DEFAULT_CACHE_ROOT = "~/.cache/moe_dist"


def cache_root(cache_dir: str) -> Path:
    """``data.cache_dir`` resolved to an absolute directory ('' means ~/.cache/moe_dist); a
    DataError if it is, or lies below, a file."""
    root = Path(cache_dir or DEFAULT_CACHE_ROOT).expanduser().resolve()
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == root else f"lies below {path}, which is a file"
                raise DataError(f"data.cache_dir = {cache_dir!r}: {root} {where}, not a directory; set "
                                "data.cache_dir to a directory ('' means ~/.cache/moe_dist)")
            break
    return root


def fingerprint(value: Any) -> str:
    """A stable 20-hex-digit hash of a JSON-serialisable value (key order does not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_identity(paths: list[Path]) -> list[list[Any]]:
    """(absolute path, size in bytes, mtime in ns) of each file: changes when a file changes."""
    rows = []
    for path in sorted(paths):
        stat = path.stat()
        rows.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return rows


def _temp_sibling(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish_dir(final: Path, write: Callable[[Path], None]) -> bool:
    """Create directory `final` atomically: `write(tmp)` fills a temporary directory that is then
    renamed to `final`. Returns False when another process published `final` first (its copy is
    kept and ours discarded)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        try:
            write(tmp)
        except OSError as exc:  # np.save and write_text name no file on a full disk
            raise with_path(exc, tmp, f"cannot write the data cache entry {final.name}") from exc
        try:
            os.rename(tmp, final)
        except OSError:
            # rename onto an existing non-empty directory fails: someone else won the race.
            if not final.is_dir():
                raise
            return False
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_file(final: Path, data: bytes) -> bool:
    """Create file `final` with `data` atomically and only if it does not exist yet (hard link of
    a complete temporary file). Returns False when another process created it first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        tmp.write_bytes(data)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, tmp, f"cannot write the data cache file {final.name}") from exc
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
