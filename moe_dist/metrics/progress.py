"""A tqdm progress bar over optimizer steps, shown on the logging rank only.

The bar advances every step (host-only work) and its loss / tokens-per-second readout changes
only at logging steps, from values the trainer already moved to the host. On other ranks, or
with ``log.progress_bar: false``, every method is a no-op.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


class ProgressBar:
    """``update()`` once per optimizer step; ``set_metrics(...)`` at logging steps."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True,
                 file: TextIO | None = None) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        if enabled:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=file if file is not None else sys.stderr,
                             mininterval=0.5)

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def set_metrics(self, *, loss: float | None = None, tokens_per_s: float | None = None,
                    val_loss: float | None = None) -> None:
        """Show the latest host values (never pass device tensors: that would sync)."""
        if self._bar is None:
            return
        postfix: dict[str, str] = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if val_loss is not None:
            postfix["val"] = f"{val_loss:.4f}"
        if tokens_per_s is not None:
            postfix["tok/s"] = _human(tokens_per_s)
        self._bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """Print a line above the bar (plain print would tear it)."""
        if self._bar is not None:
            self._bar.write(message, file=self._bar.fp)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_progress(log_cfg: Any, total_steps: int, start_step: int, is_logging_rank: bool,
                   file: TextIO | None = None) -> ProgressBar:
    """The bar for this rank: live on the logging rank when ``log.progress_bar`` is true and the
    stream is a terminal (in a Slurm log a bar is only carriage returns; text lines replace it)."""
    stream = file if file is not None else sys.stderr
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    return ProgressBar(total_steps, start_step, enabled=bool(log_cfg.progress_bar and is_logging_rank and interactive),
                       file=file)


def format_step_line(step: int, total_steps: int, record: dict[str, float]) -> str:
    """One log line for a logging step, from host values: what the bar shows, and more."""
    parts = [f"step {step}/{total_steps}"]
    for key, label, fmt in (("train/loss", "loss", "{:.4f}"), ("val/loss", "val_loss", "{:.4f}"),
                            ("train/lr", "lr", "{:.2e}"), ("train/grad_norm", "grad_norm", "{:.3f}")):
        if record.get(key) is not None:
            parts.append(f"{label} {fmt.format(record[key])}")
    if record.get("perf/tokens_per_s") is not None:
        parts.append(f"{_human(record['perf/tokens_per_s'])} tok/s")
    if record.get("perf/mfu") is not None:
        parts.append(f"mfu {100 * record['perf/mfu']:.1f}%")
    if record.get("perf/peak_memory_gib") is not None:
        parts.append(f"peak mem {record['perf/peak_memory_gib']:.2f} GiB")
    return " | ".join(parts)


def _human(value: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.1f}"
