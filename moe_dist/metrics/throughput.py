"""Tokens per second and step time, measured over logging windows.

:meth:`ThroughputMeter.measure` reads the wall clock at a logging step right after synchronising
the device, so the time it reports covers the queued GPU work of the whole window.
:meth:`ThroughputMeter.mark` closes a window without waiting (a CUDA event on the device
timeline) and :meth:`ThroughputMeter.measure_mark` times it once the device has passed it: the
trainer's way, which reads each window at a later logging step. Use one of the two per meter.
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


@dataclass(frozen=True)
class WindowMark:
    """A window closed by :meth:`ThroughputMeter.mark`, to be measured once the device passed it."""

    steps: int
    tokens: int
    paused_s: float
    """Paused (validation, checkpoint) seconds inside the window."""
    stamp: float | torch.cuda.Event
    """End of the window: a CUDA event (timing enabled) or a host clock reading."""


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
        self._last_stamp: float | torch.cuda.Event | None = None
        """Where the last marked window ended (see :meth:`mark`)."""
        self._paused_s = 0.0
        self._tokens = 0
        self._steps = 0

    def start(self) -> None:
        """Begin a window (call before the first training step, and after a resume)."""
        self._synchronize()
        self._start = self._clock()
        self._stamp_now()
        self._paused_s = 0.0
        self._tokens = 0
        self._steps = 0

    def step(self, tokens: int) -> None:
        """Record one optimizer step that processed ``tokens`` tokens (a host integer)."""
        self._tokens += int(tokens)
        self._steps += 1

    def mark(self) -> WindowMark:
        """Close the window at this point of the device's queue without waiting for it: the steps
        and tokens recorded since the last mark (or measure, or start), the paused time in
        between, and a timestamp on the device timeline (a CUDA event; the host clock elsewhere,
        where the work is already done). :meth:`measure_mark` turns it into rates later."""
        if self._start is None:
            raise RuntimeError("ThroughputMeter.mark() called before start()")
        stamp: float | torch.cuda.Event
        if self.device.type == "cuda":
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = self._clock()
        mark = WindowMark(self._steps, self._tokens, self._paused_s, stamp)
        self._steps = self._tokens = 0
        self._paused_s = 0.0
        return mark

    def measure_mark(self, mark: WindowMark) -> Throughput:
        """The rates of the window ``mark`` closed, once the device has passed it (the caller has
        waited for work queued after the mark). Marks are measured in the order they were made;
        the first one after :meth:`start` runs from the start."""
        previous = self._last_stamp
        if isinstance(mark.stamp, float):
            assert isinstance(previous, float)
            elapsed = mark.stamp - previous
        else:
            assert isinstance(previous, torch.cuda.Event)
            elapsed = previous.elapsed_time(mark.stamp) / 1000.0
        self._last_stamp = mark.stamp
        seconds = max(elapsed - mark.paused_s, 1e-9)
        return Throughput(tokens_per_s=mark.tokens / seconds, step_time_ms=1000.0 * seconds / max(mark.steps, 1),
                          steps=mark.steps, tokens=mark.tokens, seconds=seconds)

    def measure(self) -> Throughput:
        """Close the window, return its rates and open the next one (waits for the device)."""
        if self._start is None:
            raise RuntimeError("ThroughputMeter.measure() called before start()")
        self._synchronize()
        now = self._clock()
        seconds = max(now - self._start - self._paused_s, 1e-9)
        steps = max(self._steps, 1)
        result = Throughput(tokens_per_s=self._tokens / seconds, step_time_ms=1000.0 * seconds / steps,
                            steps=self._steps, tokens=self._tokens, seconds=seconds)
        self._start = now
        self._stamp_now()
        self._paused_s = 0.0
        self._tokens = 0
        self._steps = 0
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

    def _stamp_now(self) -> None:
        """Where the next marked window starts: now (the device is idle after a sync)."""
        if self.device.type == "cuda":
            self._last_stamp = torch.cuda.Event(enable_timing=True)
            self._last_stamp.record()
        else:
            self._last_stamp = self._start

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
