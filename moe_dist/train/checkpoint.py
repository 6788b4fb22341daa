"""Atomic, verified checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX``.

A save writes every file into a temporary sibling directory, records each file's SHA-256 in
``manifest.json``, re-reads the files to verify them, and only then renames the directory
into place, so a kill at any moment leaves the previous checkpoint intact. Old checkpoints
are pruned after a verified save. A load checks the manifest before trusting any byte and
reports mismatched tensors by name and shape.

The files: the model and optimizer state in torch.distributed.checkpoint format (written by
the plan through the ``write_payload`` callback; one format for every parallel layout, see
``moe_dist.distributed.checkpoint``), ``trainer.pt`` (step, scheduler, data position, RNG
states) and ``config.yaml``. The DeepSpeed engine writes its own files into the same frame.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moe_dist.distributed.checkpoint import CheckpointError  # one error for files and DCP payloads

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints (those with a manifest), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "manifest.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The verified checkpoint ``checkpoint.resume`` names: None for 'none' or an empty 'auto'."""
    if resume == "none":
        return None
    directory = latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if directory is not None:
        verify_checkpoint(directory)
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_manifest(directory: Path, step: int) -> None:
    """Hash every file in ``directory`` (recursively) into manifest.json, then verify."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {"step": step, "created": time.time(),
                "files": {str(p.relative_to(directory)): _sha256(p) for p in files}}
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / "manifest.json")
    verify_checkpoint(directory)


def verify_checkpoint(directory: Path) -> dict:
    """Raise :class:`CheckpointError` unless every file matches the manifest."""
    manifest_path = Path(directory) / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no manifest.json: it is incomplete "
                              "(a save was interrupted); delete it or resume from an older one")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {directory}: manifest.json is corrupt ({exc})") from exc
    for name, expected in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: file {name} listed in the manifest is missing")
        actual = _sha256(path)
        if actual != expected:
            raise CheckpointError(f"checkpoint {directory}: file {name} is corrupt (sha256 {actual[:12]}... "
                                  f"!= manifest {expected[:12]}...); resume from an older checkpoint")
    return manifest


def save_checkpoint(run_dir: Path, step: int, write_payload: Callable[[Path], None], keep_last: int,
                    is_writer: bool = True, barrier: Callable[[], None] | None = None) -> Path:
    """Write a checkpoint atomically.

    ``write_payload(tmp_dir)`` writes this rank's files. With several ranks, every rank
    calls this; ``barrier`` separates writing from the writer's manifest and rename.
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if barrier:
        barrier()
    write_payload(tmp)
    if barrier:
        barrier()
    if is_writer:
        write_manifest(tmp, step)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step replaces it only after verification
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


# --------------------------------------------------------------------------------------------
# State helpers
# --------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_file(directory: Path, name: str) -> Any:
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} lacks {name}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated files
        raise CheckpointError(f"checkpoint {directory}: cannot read {name} ({exc})") from exc


def check_state_dict_fits(model_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                          source: str) -> None:
    """Name every missing, unexpected or mis-shaped tensor before load_state_dict does."""
    problems = []
    for key, tensor in expected.items():
        if key not in model_state:
            problems.append(f"missing tensor {key} (model expects shape {tuple(tensor.shape)})")
        elif tuple(model_state[key].shape) != tuple(tensor.shape):
            problems.append(f"tensor {key}: checkpoint shape {tuple(model_state[key].shape)} != "
                            f"model shape {tuple(tensor.shape)}")
    for key in model_state.keys() - expected.keys():
        problems.append(f"unexpected tensor {key} in checkpoint")
    if problems:
        listed = "\n  ".join(problems[:20])
        raise CheckpointError(f"checkpoint {source} does not match the model "
                              f"({len(problems)} problem(s)); was it written with another config?\n  {listed}")
