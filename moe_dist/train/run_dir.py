"""The run directory: one per run, holding config.yaml, provenance.json, metrics.jsonl, tb/ and
checkpoints/.

A directory that already holds a *different* run is refused (unless the user asks to
overwrite it), so two experiments never interleave their metrics and checkpoints.

The run's identity, ``config.yaml``, is written only once the run has started: data and model
built, the checkpoint to resume from loaded (:func:`write_run_config`, called by the trainer).
A run that fails before (a wrong ``data.text_field``, a model that does not build) leaves at
most an empty directory, so the corrected command is not refused as "a different run".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from moe_dist.config import Config, ConfigError
from moe_dist.config.errors import with_path
from moe_dist.config.loading import describe_yaml_error

# Keys a resumed run may change without becoming a different run.
RESUMABLE_KEYS = ("train.steps", "checkpoint.", "log.", "parallel.", "train.engine", "train.device",
                  "train.micro_batch_size", "train.profile_", "train.optimizer_impl", "data.cache_dir", "zero.")


def default_run_dir(config_path: str | None) -> Path:
    stem = Path(config_path).stem if config_path else "tiny"
    return Path("runs") / stem


def flatten_config(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested config dict -> {"section.key": value}."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring keys a resume may change."""
    old_flat, new_flat = flatten_config(old), flatten_config(new)
    keys = sorted(old_flat.keys() | new_flat.keys())
    return [key for key in keys
            if old_flat.get(key) != new_flat.get(key) and not key.startswith(RESUMABLE_KEYS)]


def check_run_dir_path(run_dir: Path) -> None:
    """Refuse a run directory that is a file or lies below one (even with --overwrite, which
    would otherwise delete a file the user named by mistake)."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == run_dir else f"lies below {path}, which is a file"
            raise ConfigError(f"run directory {run_dir} {where}, not a directory; pass --run-dir with a "
                              "directory path (it is created if missing)")


def read_run_config(config_file: Path) -> dict:
    """The config.yaml of an existing run directory, or a ConfigError saying it is not one."""
    try:
        old = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = describe_yaml_error(exc) if isinstance(exc, yaml.YAMLError) else f"not text: {exc.reason}"
        raise ConfigError(f"run directory {config_file.parent} has a config.yaml that is not valid YAML "
                          f"({reason}); pass --run-dir NEW_DIR for a new run, or --overwrite to "
                          "replace it") from exc
    if old is None:
        return {}
    if not isinstance(old, dict):
        raise ConfigError(f"run directory {config_file.parent} has a config.yaml that is not a moe_dist config "
                          f"(a {type(old).__name__}, not a mapping of sections); pass --run-dir NEW_DIR for a "
                          "new run, or --overwrite to replace it")
    return old


def prepare_run_dir(run_dir: Path, cfg: Config, overwrite: bool, is_writer: bool) -> None:
    """Create or re-open ``run_dir`` for ``cfg``; refuse a directory of another run. Writes no
    file: :func:`write_run_config` records the run once it has started.

    Raises ConfigError for a path that cannot be a run directory or holds another run, and
    OSError (with the path) when the file system refuses (read-only, permissions, disk full).
    """
    run_dir = Path(run_dir)
    check_run_dir_path(run_dir)
    config_file = run_dir / "config.yaml"
    if run_dir.exists() and overwrite and is_writer:
        shutil.rmtree(run_dir)
    elif config_file.is_file():
        old = read_run_config(config_file)
        differences = config_differences(old, cfg.to_dict())
        if differences:
            shown = ", ".join(f"{k} ({flatten_config(old).get(k)!r} -> {flatten_config(cfg.to_dict()).get(k)!r})"
                              for k in differences[:6])
            raise ConfigError(f"run directory {run_dir} holds a different run: {shown}; pass "
                              "--run-dir NEW_DIR for a new run, or --overwrite to replace it")
        if cfg.checkpoint.resume == "none" and (run_dir / "checkpoints").is_dir() \
                and any((run_dir / "checkpoints").iterdir()):
            raise ConfigError(f"run directory {run_dir} already has checkpoints and checkpoint.resume=none; "
                              "use checkpoint.resume=auto to continue, or --overwrite to start over")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"run directory {run_dir} is not empty and holds no moe_dist run "
                          "(no config.yaml); choose another --run-dir or pass --overwrite")
    if is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)  # an empty directory is a valid new run directory


def write_run_config(run_dir: Path, config_yaml: str) -> None:
    """Write the run's identity, ``<run_dir>/config.yaml``, atomically (the config as loaded,
    before the trainer resolved anything from the data, so the same command compares equal)."""
    config_file = Path(run_dir) / "config.yaml"
    tmp = config_file.with_name("config.yaml.tmp")
    try:
        tmp.write_text(config_yaml)
        tmp.replace(config_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, config_file, f"cannot write {config_file.name}") from exc
