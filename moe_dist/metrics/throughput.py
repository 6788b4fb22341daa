"""Tokens per second and step time, measured over logging windows.

The meter reads the wall clock only at logging steps, right after synchronising the device, so
the time it reports covers the queued GPU work of the whole window and nothing in between syncs.
Per step, :meth:`ThroughputMeter.step` adds a host integer: no device work at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moe_dist.metrics.sink import to_host_scalars


@dataclass(frozen=True)
class Throughput:
    """One logging window."""

    tokens_per_s: float
    """Tokens processed in the window / wall seconds of the window (paused time excluded)."""
    step_time_ms: float
    """Wall milliseconds per optimizer step in the window."""
    steps: int
    tokens: int
    seconds: float


class ThroughputMeter:
    """Counts tokens between calls of :meth:`measure` and divides by the elapsed wall time.

    ``device``: CUDA devices are synchronised before each clock read (at logging steps only);
    other devices need no sync. ``clock`` is injectable for tests.

    Usage::

        meter = ThroughputMeter(device); meter.start()
        for step in ...:
            train_step(); meter.step(tokens_in_step)
            if step % log_every == 0:
                rate = meter.measure()         # syncs CUDA once
            if eval_step:
                with meter.paused():           # validation time is not training time
                    evaluate()
    """

    def __init__(self, device: torch.device | str = "cpu",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device(device)
        self._clock = clock
        self._start: float | None = None
        self._paused_s = 0.0
        self._tokens = 0
        self._steps = 0

    def start(self) -> None:
        """Begin a window (call before the first training step, and after a resume)."""
        self._synchronize()
        self._start = self._clock()
        self._paused_s = 0.0
        self._tokens = 0
        self._steps = 0

    def step(self, tokens: int) -> None:
        """Record one optimizer step that processed ``tokens`` tokens (a host integer)."""
        self._tokens += int(tokens)
        self._steps += 1

    def take_counts(self) -> tuple[int, int]:
        """(steps, tokens) recorded since the last call or window start, then zeroed: what a
        deferred window (:meth:`measure` with ``counts``) covers."""
        counts = (self._steps, self._tokens)
        self._steps = 0
        self._tokens = 0
        return counts

    def measure(self, synchronize: bool = True, counts: tuple[int, int] | None = None) -> Throughput:
        """Close the window, return its rates and open the next one.

        ``synchronize=False`` is for a caller that has just waited for the window's last step
        on the device by other means (an event): the clock is read at once. ``counts`` (from
        :meth:`take_counts`) are the steps and tokens of that window, when steps recorded since
        belong to the next one."""
        if self._start is None:
            raise RuntimeError("ThroughputMeter.measure() called before start()")
        if synchronize:
            self._synchronize()
        now = self._clock()
        steps, tokens = counts if counts is not None else self.take_counts()
        seconds = max(now - self._start - self._paused_s, 1e-9)
        result = Throughput(tokens_per_s=tokens / seconds, step_time_ms=1000.0 * seconds / max(steps, 1),
                            steps=steps, tokens=tokens, seconds=seconds)
        self._start = now
        self._paused_s = 0.0
        return result

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Exclude the enclosed time (validation, checkpointing) from the window."""
        self._synchronize()
        begin = self._clock()
        try:
            yield
        finally:
            self._synchronize()
            self._paused_s += self._clock() - begin

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            # NOTE: device-to-host sync (logging, pause and start boundaries only).
            torch.cuda.synchronize(self.device)


class DeviceMeans:
    """Averages of per-step scalar tensors over a logging window, kept on the device.

    ``add({"train/loss": loss, ...})`` queues device additions (no sync); ``pop()`` returns the
    window means as floats with one device-to-host copy and starts a new window. Values may also
    be Python numbers.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float32)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1

    def pop_on_device(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """The window means as (sorted keys, one fp32 tensor on ``device``), with no host sync;
        starts a new window. ``pop`` is the same read on the host."""
        keys = sorted(self._sums)
        values = [self._sums[key] / self._counts[key] for key in keys]
        stacked = torch.stack([value.reshape(()).to(device, torch.float32) if isinstance(value, torch.Tensor)
                               else torch.tensor(float(value), device=device) for value in values]) \
            if keys else torch.zeros(0, device=device)
        self._sums, self._counts = {}, {}
        return keys, stacked

    def pop(self) -> dict[str, float]:
        sums = to_host_scalars(self._sums)
        means = {key: sums[key] / self._counts[key] for key in sums}
        self._sums, self._counts = {}, {}
        return means

    def __len__(self) -> int:
        return len(self._sums)
