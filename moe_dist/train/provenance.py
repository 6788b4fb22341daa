"""What produced a run: ``<run_dir>/provenance.json``, one entry per start of the run.

Rank 0 appends an entry each time the run starts (the first start and every resume), once the
data, the model and the checkpoint to resume from are in place, so a start that failed earlier
leaves no entry. The file is a JSON list, rewritten atomically (temporary file, then rename)::

    [{"started_at": "2026-12-02T10:14:03+00:00", "start_step": 0,
      "moe_dist_version": "0.1.0", "git": {"commit": "4b5ec49...", "dirty": false},
      "command": "/usr/bin/python -m moe_dist.cli train --run-dir runs/a train.steps=20",
      "argv": [...], "cwd": "...", "hostname": "node17", "launcher": "torchrun",
      "world_size": 8, "mesh": {"dp": 4, "tp": 2, "ep": 4, "etp": 1, "edp": 2},
      "engine": "native", "device": "cuda",
      "python": "3.12.3", "torch": "2.13.0+cu128", "deepspeed": "0.19.8", "cuda": "12.8",
      "cudnn": 91002, "nccl": "2.27.3", "gpu": "NVIDIA H100 80GB HBM3"},
     {"started_at": "...", "start_step": 120, ...}]

``git`` is null when the installed package is not inside a git work tree; the CUDA fields are
null on a CPU build. Nothing here imports DeepSpeed (its version comes from the package
metadata). ``moe-dist --version`` prints :func:`version_text`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import shlex
import socket
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_dist.config.errors import with_path

if TYPE_CHECKING:  # torch is imported where it is used: `moe-dist --version` stays fast
    import torch

    from moe_dist.distributed.mesh import MeshLayout

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def package_version() -> str:
    """moe_dist's installed version (``moe-dist --version``); 'unknown' when not installed."""
    try:
        return importlib.metadata.version("moe_dist")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: Path = PACKAGE_DIR) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git work tree holding ``path``, or None (no git,
    not a work tree). ``dirty`` is true when tracked files differ from the commit."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def version_text() -> str:
    """``moe-dist 0.1.0 (git 4b5ec49, modified)``: the version, and the commit when the package
    runs from a git work tree."""
    git = git_state()
    if git is None:
        return f"moe-dist {package_version()}"
    return f"moe-dist {package_version()} (git {git['commit'][:12]}{', modified' if git['dirty'] else ''})"


def collect_provenance(layout: MeshLayout, start_step: int, launcher: str, engine: str,
                       device: torch.device, argv: list[str] | None = None) -> dict[str, Any]:
    """One provenance entry (see the module docstring) for a run starting at ``start_step``."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    mesh = asdict(layout)
    world_size = mesh.pop("world_size")
    mesh["edp"] = layout.edp
    cuda = torch.version.cuda
    entry: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "start_step": start_step,
        "moe_dist_version": package_version(),
        "git": git_state(),
        "command": shlex.join([sys.executable, *argv]),
        "argv": argv,
        "cwd": str(Path.cwd()),
        "hostname": socket.gethostname(),
        "launcher": launcher,
        "world_size": world_size,
        "mesh": mesh,
        "engine": engine,
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _distribution_version("deepspeed"),
        "cuda": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": None,
        "gpu": None,
    }
    if device.type == "cuda":
        entry["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        entry["gpu"] = torch.cuda.get_device_name(device)
    return entry


def read_provenance(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``<run_dir>/provenance.json``, oldest first ([] when there is none)."""
    path = Path(run_dir) / PROVENANCE_FILE
    if not path.is_file():
        return []
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds a {type(entries).__name__}, not a list of run starts")
    return entries


def append_provenance(run_dir: Path, entry: dict[str, Any]) -> Path:
    """Add ``entry`` to ``<run_dir>/provenance.json`` atomically; return the file's path.

    A file that cannot be read as a list (damaged by hand) is kept as ``provenance.json.unreadable``
    and a new list is started, with a warning: provenance never stops a run.
    """
    path = Path(run_dir) / PROVENANCE_FILE
    try:
        entries = read_provenance(run_dir)
    except (ValueError, UnicodeDecodeError) as exc:
        kept = path.with_name(PROVENANCE_FILE + ".unreadable")
        logger.warning("%s is not a list of run starts (%s); kept as %s, starting a new one", path, exc, kept.name)
        path.replace(kept)
        entries = []
    entries.append(entry)
    tmp = path.with_name(PROVENANCE_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, path, f"cannot write {PROVENANCE_FILE}") from exc
    return path
