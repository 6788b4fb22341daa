"""Where metrics go: TensorBoard event files, ``metrics.jsonl``, or nowhere.

Every writer implements the :class:`MetricsSink` protocol. The trainer holds exactly one object,
the :class:`MetricsLogger` returned by :func:`build_sinks`, and calls it unconditionally on
every rank; on ranks that do not log it fans out to a :class:`NullSink`, so no
``if rank == 0`` appears in the training loop.

Scalar names: the trainer always passes TensorBoard tags (``train/loss``, ``perf/mfu``, ...).
TensorBoard stores them as given. :class:`JsonlSink` renames the documented tags to the plain
keys of ``metrics.jsonl`` (``train/loss`` -> ``loss``, ``val/loss`` -> ``val_loss``; see
:data:`JSONL_KEYS` and docs/metrics.md), keeps any other tag verbatim, and merges every scalar of
one step into a single JSON line ``{"step": s, ...}``.

Host synchronisation: sinks only accept host values. :func:`to_host_scalars` turns a mapping
that may hold 0-d device tensors into floats with one stacked device-to-host copy; the logger
calls it, so the trainer can pass its device-side accumulators directly, at logging steps only.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_dist.config.errors import with_path
from moe_dist.metrics.background import BackgroundSink
from moe_dist.metrics.protocol import MetricsSink
from moe_dist.metrics.wandb_sink import WandbSink, require_wandb

ScalarLike = float | int | torch.Tensor

JSONL_KEYS: dict[str, str] = {
    "train/loss": "loss",
    "train/lm_loss": "lm_loss",
    "train/aux_loss": "aux_loss",
    "train/z_loss": "z_loss",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
    "val/loss": "val_loss",
    "perf/tokens_per_s": "tokens_per_s",
    "perf/mfu": "mfu",
    "perf/step_time_ms": "step_time_ms",
    "perf/peak_memory_gib": "peak_memory_gib",
}
"""TensorBoard tag -> ``metrics.jsonl`` key. Tags not listed keep their tag as the key."""

JSONL_FILENAME = "metrics.jsonl"
_HISTOGRAM_BINS = 32
TENSORBOARD_SUBDIR = "tb"


class NullSink:
    """Accepts everything and writes nothing (ranks that do not log, or logging disabled)."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        pass

    def image(self, step: int, tag: str, image_chw: np.ndarray) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Writes TensorBoard event files into ``log_dir`` through ``SummaryWriter``.

    ``purge_step``: a resumed run passes its first step (resumed step + 1). The new event file
    then starts with a session-start marker at that step, and TensorBoard drops every event of
    the earlier files at or after it: what a killed attempt logged past its last checkpoint.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        # Imported here: the writer pulls in tensorboard/protobuf, which ranks that never log
        # (and tests that never touch TensorBoard) should not pay for.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # A deep queue: a logging step adds a few hundred events (scalars and histograms per MoE
        # layer), and with the default depth of 10 every add waits for the writer thread.
        try:
            self._writer = SummaryWriter(log_dir=str(self.log_dir), max_queue=4096, flush_secs=30,
                                         purge_step=purge_step)
        except OSError as exc:  # its first write names no file
            raise with_path(exc, self.log_dir, "cannot write the TensorBoard event file") from exc

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        array = np.asarray(values, dtype=np.float64).ravel()
        if array.size == 0:
            return
        # Evenly spaced buckets, counted here and written raw: the writer's default
        # ("tensorflow", ~1500 exponential buckets through np.histogram) costs ~0.5 ms a call.
        low, high = float(array.min()), float(array.max())
        if low == high:
            low, high = low - 0.5, high + 0.5
        buckets = int(min(_HISTOGRAM_BINS, array.size))
        edges = np.linspace(low, high, buckets + 1)
        index = np.minimum(((array - low) / (high - low) * buckets).astype(np.int64), buckets - 1)
        counts = np.bincount(index, minlength=buckets)
        # TensorBoard stores right bucket limits; a leading empty bucket keeps the left edge.
        self._writer.add_histogram_raw(
            tag, min=float(array.min()), max=float(array.max()), num=int(array.size),
            sum=float(array.sum()), sum_squares=float(np.dot(array, array)),
            bucket_limits=edges.tolist(), bucket_counts=[0, *counts.tolist()], global_step=step)

    def image(self, step: int, tag: str, image_chw: np.ndarray) -> None:
        _check_chw(tag, image_chw)
        self._writer.add_image(tag, image_chw, global_step=step, dataformats="CHW")

    def text(self, tag: str, text: str) -> None:
        self._writer.add_text(tag, text, global_step=0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JsonlSink:
    """Appends one JSON object per logged step to ``path``.

    Scalars of the same step are merged: the pending line is written when a scalar for another
    step arrives, on :meth:`flush` and on :meth:`close`. So the newest logged step reaches the
    file one logging window late unless flushed; the trainer flushes before every checkpoint,
    which makes every step a checkpoint covers durable. Should scalars for a step that was already
    written arrive later, they go out as a second line with the same ``step``;
    :func:`read_metrics` merges lines by step (later values win, which also resolves the steps
    that a resumed run repeats). Non-finite values are written as ``null`` (strict JSON).
    Histograms, images and text are TensorBoard-only and ignored here.
    """

    def __init__(self, path: str | Path, key_map: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key_map = dict(JSONL_KEYS if key_map is None else key_map)
        # Line-buffered: each finished step reaches the file at once, so a killed run loses at
        # most the step still being merged.
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._step: int | None = None
        self._pending: dict[str, float | None] = {}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._step is not None and step != self._step:
            self._write_pending()
        self._step = step
        for tag, value in values.items():
            number = float(value)
            self._pending[self._key_map.get(tag, tag)] = number if math.isfinite(number) else None

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        pass

    def image(self, step: int, tag: str, image_chw: np.ndarray) -> None:
        pass

    def text(self, tag: str, text: str) -> None:
        pass

    def flush(self) -> None:
        self._write_pending()
        try:
            self._file.flush()
        except OSError as exc:
            raise with_path(exc, self.path, f"cannot write {self.path.name}") from exc

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.flush()
            finally:
                with contextlib.suppress(OSError):  # flush() above already reported it
                    self._file.close()

    def _write_pending(self) -> None:
        if self._step is None or not self._pending:
            return
        record: dict[str, Any] = {"step": self._step, **self._pending}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as exc:  # write() names no file
            raise with_path(exc, self.path, f"cannot write {self.path.name}") from exc
        self._step = None
        self._pending = {}


class MetricsLogger:
    """Fans every call out to its sinks; the one metrics object the trainer holds.

    ``scalars`` accepts floats or 0-d tensors (moved to the host in one copy). ``enabled`` is
    False when no sink writes anything, so callers may skip building expensive payloads (an
    image, say); collectives such as the expert-load reduce must still run on every rank.
    """

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)
        self.enabled = any(not isinstance(sink, NullSink) for sink in self.sinks)

    def scalars(self, step: int, values: Mapping[str, ScalarLike]) -> None:
        if not self.enabled or not values:
            return
        host = to_host_scalars(values)
        for sink in self.sinks:
            sink.scalars(step, host)

    def histogram(self, step: int, tag: str, values: np.ndarray | torch.Tensor) -> None:
        if not self.enabled:
            return
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        for sink in self.sinks:
            sink.histogram(step, tag, array)

    def image(self, step: int, tag: str, image_chw: np.ndarray | Callable[[], np.ndarray]) -> None:
        """``image_chw`` may be a function that draws it: a background writer calls it on its
        worker thread, any other sink gets it drawn here."""
        if not self.enabled:
            return
        if callable(image_chw) and not all(isinstance(sink, BackgroundSink) for sink in self.sinks):
            image_chw = image_chw()
        if not callable(image_chw):
            _check_chw(tag, image_chw)
        for sink in self.sinks:
            sink.image(step, tag, image_chw)

    def text(self, tag: str, text: str) -> None:
        for sink in self.sinks:
            sink.text(tag, text)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_sinks(run_dir: str | Path, log_cfg: Any, is_logging_rank: bool,
                background: bool = True, purge_step: int | None = None,
                run_config: Mapping[str, Any] | None = None) -> MetricsLogger:
    """The metrics logger for this rank.

    The logging rank writes ``<run_dir>/metrics.jsonl`` always and ``<run_dir>/tb/`` when
    ``log.tensorboard`` is true, through one :class:`BackgroundSink` (histograms, PNG encoding
    and file writes happen on a worker thread); every other rank gets a logger over a
    :class:`NullSink`. ``log_cfg`` is the ``log`` section of the config (``LogConfig``);
    ``purge_step`` goes to :class:`TensorBoardSink`. With ``log.wandb`` the logging rank also logs
    to Weights & Biases (``WandbSink``, with ``run_config`` as the run's config); every rank checks
    that wandb is installed first, so all fail alike when it is not.
    """
    use_wandb = bool(getattr(log_cfg, "wandb", False))
    if use_wandb:
        require_wandb()
    if not is_logging_rank:
        return MetricsLogger([NullSink()])
    run_dir = Path(run_dir)
    sinks: list[MetricsSink] = [JsonlSink(run_dir / JSONL_FILENAME)]
    if log_cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir / TENSORBOARD_SUBDIR, purge_step=purge_step))
    if use_wandb:
        sinks.append(WandbSink(run_dir, log_cfg, run_config))
    return MetricsLogger([BackgroundSink(MetricsLogger(sinks))] if background else sinks)


def to_host_scalars(values: Mapping[str, ScalarLike]) -> dict[str, float]:
    """Floats for a mapping of Python numbers and 0-d (or 1-element) tensors.

    All tensors are stacked and copied together: one device-to-host sync per call, however many
    metrics there are, instead of one ``.item()`` each.
    """
    out: dict[str, float] = {}
    tensor_keys: list[str] = []
    tensors: list[torch.Tensor] = []
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
            tensor_keys.append(key)
            tensors.append(value.detach().reshape(()).to(torch.float64))
        else:
            out[key] = float(value)
    if tensors:
        devices = {t.device for t in tensors}
        if len(devices) > 1:  # rare: move everything next to the first one, then copy once
            tensors = [t.to(tensors[0].device) for t in tensors]
        # NOTE: device-to-host sync (once for all tensor-valued metrics).
        host = torch.stack(tensors).cpu().tolist()
        out.update(zip(tensor_keys, host))
    return {key: out[key] for key in values}


def read_metrics(path: str | Path) -> dict[int, dict[str, float | None]]:
    """``metrics.jsonl`` as {step: {key: value}}, merging lines of the same step (later wins).

    A cut-off last line (the process was killed while writing it) is skipped; a malformed line
    anywhere else is an error.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    merged: dict[int, dict[str, float | None]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({exc}); delete or fix that line") from exc
        step = int(record.pop("step"))
        merged.setdefault(step, {}).update(record)
    return dict(sorted(merged.items()))


def _check_chw(tag: str, image_chw: np.ndarray) -> None:
    shape = np.shape(image_chw)
    if len(shape) != 3 or shape[0] not in (1, 3, 4):
        raise ValueError(f"image {tag!r} must be CHW with 1, 3 or 4 channels, got shape {shape}")
