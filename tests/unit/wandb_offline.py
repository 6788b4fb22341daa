"""Offline W&B runs for tests: the environment that keeps wandb off the network and out of the
home directory, and the run's records read back with wandb's own reader of its ``.wandb`` log
(``wandb leet inspect --json``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Variables for an offline run whose settings and caches stay under ``tmp_path``."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_ERROR_REPORTING": "false"}


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline runs wandb wrote under ``<run_dir>/wandb``, oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def read_records(offline_run: Path) -> list[dict]:
    """Every record of an offline run's ``.wandb`` file, as wandb itself decodes them."""
    (log,) = Path(offline_run).glob("run-*.wandb")
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> dict[int, dict]:
    """{step: {key: value}} of the run's history rows (wandb's own keys, such as ``_runtime``,
    left out)."""
    rows: dict[int, dict] = {}
    for record in records:
        if record.get("type") == "history":
            row = record["history"]
            step = int(row.get("step", {}).get("num", row["item"].get("_step", 0)))
            rows.setdefault(step, {}).update({k: v for k, v in row["item"].items() if not k.startswith("_")})
    return rows
