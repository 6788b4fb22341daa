"""The run directory: one per run, holding config.yaml, metrics.jsonl, tb/ and checkpoints/.

A directory that already holds a *different* run is refused (unless the user asks to
overwrite it), so two experiments never interleave their metrics and checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from moe_dist.config import Config, ConfigError

# Keys a resumed run may change without becoming a different run.
RESUMABLE_KEYS = ("train.steps", "checkpoint.", "log.", "parallel.", "train.engine", "train.device",
                  "train.micro_batch_size", "data.cache_dir", "zero.")


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


def prepare_run_dir(run_dir: Path, cfg: Config, overwrite: bool, is_writer: bool) -> None:
    """Create or re-open ``run_dir`` for ``cfg``; refuse a directory of another run."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if run_dir.exists() and overwrite and is_writer:
        shutil.rmtree(run_dir)
    elif config_file.is_file():
        old = yaml.safe_load(config_file.read_text()) or {}
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
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(cfg.to_yaml())
        tmp.replace(config_file)
