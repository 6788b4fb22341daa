"""User-facing errors and the small helpers their messages use.

Two kinds of failure are the user's to fix, and the command line prints each as one line
(``moe_dist/cli.py``): a :class:`ConfigError` (the config, the command line or what they point at
is wrong; exit status 2) and a failed file-system call, an ``OSError`` (a full disk, a read-only
or missing directory; exit status 4), described by :func:`describe_os_error`. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path


class ConfigError(ValueError):
    """A user-facing configuration problem: names the field, the value and the fix."""


# errno -> what to do about it; the path and the OS's wording come from the exception.
_OS_ERROR_FIXES = {
    errno.ENOSPC: "the file system is full: free space (older runs, fewer checkpoints with "
                  "checkpoint.keep_last) or point --run-dir / data.cache_dir at another file system",
    errno.EDQUOT: "the disk quota is exhausted: free space or point --run-dir / data.cache_dir elsewhere",
    errno.EROFS: "the file system is read-only: point --run-dir / data.cache_dir at a writable one",
    errno.EACCES: "this user may not access that path: fix its permissions or choose another "
                  "--run-dir / data.cache_dir",
    errno.EPERM: "this user may not access that path: fix its permissions or choose another "
                 "--run-dir / data.cache_dir",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose another path",
    errno.EISDIR: "that path is a directory, not a file",
    errno.ENOENT: "that path does not exist",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file-system call: the OS's reason, the path and what to do, e.g.
    ``cannot write config.yaml: No space left on device [ENOSPC] (runs/a/config.yaml); the file
    system is full: ...``."""
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    text = f"{reason} [{name}]" if name else reason
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    if paths:
        text += f" ({' -> '.join(paths)})"
    fix = _OS_ERROR_FIXES.get(exc.errno) if exc.errno is not None else None
    return f"{text}; {fix}" if fix else text


def with_path(exc: OSError, path: str | os.PathLike, what: str = "") -> OSError:
    """``exc`` with ``path`` filled in when the OS left it out (``write()`` and ``fsync()`` name
    no file), and ``what`` ("cannot write config.yaml") put in front of the reason. Same errno,
    so the same subclass (``OSError(ENOSPC, ...)``) and the same fix."""
    if exc.filename is not None and not what:
        return exc
    reason = exc.strerror or str(exc)
    filename = exc.filename if exc.filename is not None else str(Path(path))
    return OSError(exc.errno, f"{what}: {reason}" if what else reason, filename)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def divisors(n: int, limit: int | None = None) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return divs if limit is None else [d for d in divs if d <= limit]


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
