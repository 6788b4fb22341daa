"""Atomic, verified checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX``.

A save writes every file into a temporary sibling directory, records each file's SHA-256 in
``manifest.json``, re-reads the files to verify them, and only then renames the directory
into place, so a kill at any moment leaves the previous checkpoint intact; a save that fails
(a full disk) removes its temporary directory and says which checkpoint is intact. Old
checkpoints are pruned after a verified save. A load checks the manifest before trusting any
byte and reports mismatched tensors by name and shape; ``checkpoint.resume=auto`` skips a newest
checkpoint that does not verify (with a warning, deleting nothing) and takes the next older one.

The files: the model and optimizer state in torch.distributed.checkpoint format (written by
the plan through the ``write_payload`` callback; one format for every parallel layout, see
``moe_dist.distributed.checkpoint``), ``trainer.pt`` (step, scheduler, data position, RNG
states) and ``config.yaml``. The DeepSpeed engine writes its own files into the same frame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moe_dist.config.errors import ConfigError, describe_os_error
from moe_dist.distributed.checkpoint import CheckpointError  # one error for files and DCP payloads

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.step_(\d{8})\.tmp$")

logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_dirs(run_dir: Path, pattern: re.Pattern = _STEP_DIR) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), child) for child in root.iterdir()
                  if (match := pattern.match(child.name)) and child.is_dir())


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints (those with a manifest), oldest first."""
    return [(step, path) for step, path in _step_dirs(run_dir) if (path / "manifest.json").is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(run_dir: Path, resume: str, warn: Callable[..., None] | None = logger.warning) -> Path | None:
    """The verified checkpoint ``checkpoint.resume`` names: None for 'none' or an 'auto' without
    checkpoints.

    'auto' takes the newest checkpoint of ``run_dir`` that verifies. A newer one that does not
    (no manifest, a file missing, truncated or changed) is skipped with a warning naming it and
    left in place; leftovers of interrupted saves (``.step_*.tmp``) are never candidates. If
    checkpoints exist but none verifies, CheckpointError lists why each failed, instead of
    silently starting over. An explicit path must verify (CheckpointError), and be a checkpoint
    directory at all (ConfigError otherwise). ``warn`` (None: silent) lets ranks other than the
    logging one stay quiet.
    """
    if warn is None:
        warn = _silent
    if resume == "none":
        return None
    if resume != "auto":
        directory = Path(resume)
        _check_explicit(directory)
        verify_checkpoint(directory)
        return directory
    for step, tmp in _step_dirs(run_dir, _TMP_DIR):
        warn("ignoring %s: left by a save of step %d that was interrupted; it is never resumed from, and a save "
             "of that step replaces it (delete it to free the space)", tmp, step)
    failures = []
    for _, directory in reversed(_step_dirs(run_dir)):
        try:
            verify_checkpoint(directory)
        except CheckpointError as exc:
            failures.append(str(exc))
            warn("skipping a checkpoint that does not verify: %s. It is left in place; trying the next older one",
                 exc)
            continue
        return directory
    if failures:
        listed = "\n  ".join(failures)
        raise CheckpointError(
            f"none of the {len(failures)} checkpoint(s) in {checkpoint_root(run_dir)} verifies, so the run cannot "
            "resume (nothing was deleted):\n  " + listed + "\nRestore a good copy, or start over with --overwrite "
            "(deletes the run directory) or with a new --run-dir")
    return None


def _silent(*_args: object) -> None:
    pass


def _check_explicit(directory: Path) -> None:
    """``checkpoint.resume=PATH``: a ConfigError for a path that is no checkpoint at all (a
    checkpoint that does not verify is a CheckpointError)."""
    if not directory.exists():
        raise ConfigError(f"checkpoint.resume = {str(directory)!r}: no such directory; use 'auto', 'none' or "
                          "a checkpoint directory such as runs/NAME/checkpoints/step_00000100")
    if not directory.is_dir():
        raise ConfigError(f"checkpoint.resume = {str(directory)!r} is a file; name a checkpoint directory "
                          "such as runs/NAME/checkpoints/step_00000100")
    if (directory / CHECKPOINT_DIR).is_dir() and not (directory / "manifest.json").exists():
        newest = latest_checkpoint(directory)
        example = newest if newest is not None else checkpoint_root(directory) / "step_XXXXXXXX"
        raise ConfigError(f"checkpoint.resume = {str(directory)!r} is a run directory, not a checkpoint; "
                          f"name one of its checkpoints, e.g. checkpoint.resume={example}, or continue that "
                          f"run with --run-dir {directory} checkpoint.resume=auto")


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {directory}: manifest.json is corrupt ({exc}); "
                              "resume from an older checkpoint") from exc
    except OSError as exc:
        raise CheckpointError(f"checkpoint {directory}: cannot read manifest.json ({describe_os_error(exc)})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {directory}: manifest.json is corrupt (no 'files' mapping); "
                              "resume from an older checkpoint")
    for name, expected in files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: file {name} listed in the manifest is missing; "
                                  "resume from an older checkpoint")
        try:
            actual = _sha256(path)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {directory}: cannot read {name} ({describe_os_error(exc)})") from exc
        if actual != expected:
            raise CheckpointError(f"checkpoint {directory}: file {name} is corrupt (sha256 {actual[:12]}... "
                                  f"!= manifest {str(expected)[:12]}...); resume from an older checkpoint")
    return manifest


def save_checkpoint(run_dir: Path, step: int, write_payload: Callable[[Path], None], keep_last: int,
                    is_writer: bool = True, barrier: Callable[[], None] | None = None) -> Path:
    """Write a checkpoint atomically.

    ``write_payload(tmp_dir)`` writes this rank's files. With several ranks, every rank
    calls this; ``barrier`` separates writing from the writer's manifest and rename.

    A file-system failure (disk full, ...) or a failed payload removes the partial temporary
    directory and raises CheckpointError naming the newest intact checkpoint.
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    try:
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
    except (OSError, CheckpointError) as exc:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(run_dir, final, exc) from exc
    if is_writer:
        _prune(run_dir, step, keep_last)
    if barrier:
        barrier()
    return final


def _save_failed(run_dir: Path, final: Path, exc: Exception) -> CheckpointError:
    """What failed (a file-system error described with its fix; any other CheckpointError, such
    as the exactly-once check, as it is), plus which checkpoint is intact."""
    os_errors = [exc] if isinstance(exc, OSError) else _dcp_os_errors(exc)
    if os_errors:
        what = f"saving checkpoint {final} failed: " + "; ".join(describe_os_error(e) for e in os_errors[:1])
    else:
        what = str(exc)
    try:
        intact = [path for _, path in list_checkpoints(run_dir) if path != final]
    except OSError:
        intact = []
    kept = (f"the newest earlier checkpoint, {intact[-1]}, is intact and checkpoint.resume=auto resumes from it"
            if intact else "there is no earlier checkpoint")
    return CheckpointError(f"{what}. The partial files of {final.name} were removed; {kept}")


def _dcp_os_errors(exc: BaseException) -> list[OSError]:
    """The OSErrors inside a failed DCP save: torch's CheckpointException (the cause of the
    CheckpointError that ``distributed/checkpoint.py`` raises) maps each failed rank to an
    ``(exception, stack)`` pair."""
    failures = getattr(exc.__cause__, "failures", None)
    if not isinstance(failures, dict):
        return []
    found = []
    for _, failure in sorted(failures.items()):
        error = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(error, OSError):
            found.append(error)
    return found


def _prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``step`` (this save included). Newer ones
    (a run resumed from an older checkpoint, having skipped a corrupt newer one) are not counted
    and not deleted: a save of their step replaces them."""
    older = [path for saved, path in list_checkpoints(run_dir) if saved < step]
    for path in older[:max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


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
