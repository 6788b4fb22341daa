"""Weights & Biases: ``log.wandb=true`` adds a :class:`WandbSink` beside TensorBoard and JSONL.

The sink receives exactly the calls the other sinks receive (same tags, same host floats, same
optimizer steps), so a W&B chart of ``train/loss`` shows the numbers of TensorBoard's. It needs the
optional ``wandb`` package (``pip install -e '.[wandb]'``; ``scripts/install.sh`` installs it).

Where things go:

- scalars: ``run.log(values, step=step)``; tags keep TensorBoard's names (``train/loss``,
  ``moe/layer_1/imbalance``), so W&B groups them by their prefix the same way;
- histograms: ``wandb.Histogram`` with at most 32 bins; images: ``wandb.Image`` (PNG);
- the resolved config: the run's W&B config, so runs can be filtered by any key (``train.lr``,
  ``moe.top_k``); other text goes into the run summary under its tag;
- files: ``<run_dir>/wandb/`` (wandb's own layout); ``WANDB_MODE=offline`` writes the run there
  without a network, for a later ``wandb sync <run_dir>/wandb/offline-run-*``.

A resumed run continues the same W&B run: the id is kept in ``<run_dir>/wandb/run_id``. W&B
cannot rewrite history, so the steps that a resume repeats (logged after the checkpoint by the
interrupted attempt) keep their first values there; one warning says so.
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moe_dist.config.errors import ConfigError, with_path

logger = logging.getLogger(__name__)

WANDB_SUBDIR = "wandb"
RUN_ID_FILE = "run_id"
_HISTOGRAM_BINS = 32


def require_wandb() -> None:
    """Raise a ConfigError naming the fix when ``log.wandb=true`` but wandb is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the 'wandb' package, which is not installed; install the "
                          "[wandb] extra (pip install -e '.[wandb]', or bash scripts/install.sh), "
                          "or set log.wandb=false")


def run_id_for(run_dir: Path) -> str:
    """The W&B run id of this run directory: read from ``wandb/run_id``, or made and stored."""
    path = Path(run_dir) / WANDB_SUBDIR / RUN_ID_FILE
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n", encoding="utf-8")
    except OSError as exc:
        raise with_path(exc, path, "cannot write the W&B run id") from exc
    return run_id


class WandbSink:
    """Logs to one W&B run; built on the logging rank only (other ranks get a NullSink)."""

    def __init__(self, run_dir: str | Path, log_cfg: Any, run_config: Mapping[str, Any] | None = None) -> None:
        require_wandb()
        import wandb  # optional dependency: imported only when log.wandb is on

        self._wandb = wandb
        run_dir = Path(run_dir)
        self.run = wandb.init(
            project=log_cfg.wandb_project,
            entity=log_cfg.wandb_entity or None,
            name=log_cfg.wandb_run_name or run_dir.resolve().name,
            dir=str(run_dir),
            config=dict(run_config) if run_config is not None else None,
            id=run_id_for(run_dir),
            resume="allow",
        )
        self._has_config = run_config is not None
        self._closed = False
        self._warned_repeat = False

    def _accepts(self, step: int) -> bool:
        """W&B drops (with a warning each time) any step below the run's current one."""
        current = int(self.run.step)
        if step >= current:
            return True
        if not self._warned_repeat:
            self._warned_repeat = True
            logger.warning("W&B: step %d is below the run's step %d (a resume repeats the steps an interrupted "
                           "attempt logged after its checkpoint); W&B keeps their first values", step, current)
        return False

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if values and self._accepts(step):
            self.run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        array = np.asarray(values, dtype=np.float64).ravel()
        if array.size and self._accepts(step):
            bins = int(min(_HISTOGRAM_BINS, array.size))
            self.run.log({tag: self._wandb.Histogram(array, num_bins=bins)}, step=step)

    def image(self, step: int, tag: str, image_chw: np.ndarray) -> None:
        if self._accepts(step):
            hwc = np.ascontiguousarray(np.transpose(np.asarray(image_chw), (1, 2, 0)))
            if hwc.shape[2] == 1:
                hwc = hwc[:, :, 0]
            self.run.log({tag: self._wandb.Image(hwc)}, step=step)

    def text(self, tag: str, text: str) -> None:
        if tag == "config" and self._has_config:
            return  # already the run's W&B config, key by key
        self.run.summary[tag] = text

    def flush(self) -> None:
        pass  # wandb sends on its own service process; finish() waits for it

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()
