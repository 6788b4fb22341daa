"""Run a sink's work on a background thread, off the training loop's critical path.

At a logging step the trainer has just synchronised the device, so every millisecond the main
thread then spends building histograms, encoding the heat-map PNG and writing files is a
millisecond the accelerator waits. :class:`BackgroundSink` only enqueues the (already host-side)
values and returns; one worker thread replays the calls in order on the wrapped sink, while the
main thread goes on launching the next steps.

Errors raised by the wrapped sink in the worker are re-raised in the caller at the next call,
``flush`` or ``close``, so a full disk is not silently ignored.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from moe_dist.metrics.protocol import MetricsSink

_STOP = object()


class BackgroundSink:
    """Forwards every call to ``inner`` on one worker thread, in call order.

    ``flush()`` returns once everything queued before it has been written and flushed;
    ``close()`` also stops the worker. Values must not be mutated after the call (the sinks'
    inputs are fresh host floats and arrays, so this holds for :class:`MetricsLogger` callers).
    """

    def __init__(self, inner: "MetricsSink", max_pending: int = 1024) -> None:
        self.inner = inner
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
        self._worker.start()
        # A run that ends by an exception without close() still gets its queued metrics out.
        atexit.register(self._close_at_exit)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._submit(self.inner.scalars, step, dict(values))

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        self._submit(self.inner.histogram, step, tag, values)

    def image(self, step: int, tag: str, image_chw: np.ndarray) -> None:
        self._submit(self.inner.image, step, tag, image_chw)

    def text(self, tag: str, text: str) -> None:
        self._submit(self.inner.text, tag, text)

    def flush(self) -> None:
        if self._closed:
            return
        self._submit(self.inner.flush)
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        if self._closed:
            return
        self._submit(self.inner.close)
        self._queue.put(_STOP)
        self._worker.join()
        self._closed = True
        atexit.unregister(self._close_at_exit)
        self._raise_pending()

    def _close_at_exit(self) -> None:
        """At exit the run is over: a write that fails again (the disk is still full) was
        reported when it first failed, and a second report would be a traceback."""
        with contextlib.suppress(Exception):
            self.close()

    def _submit(self, fn: Any, *args: Any) -> None:
        self._raise_pending()
        if self._closed:
            raise RuntimeError("metrics sink used after close()")
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args = item
                if self._error is None:  # after a failure, drop the rest instead of piling up
                    fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError):  # a full disk and the like: the command line reports it as such
                if error.filename is not None:  # already names the file
                    raise error
                raise OSError(error.errno, f"writing metrics failed: {error.strerror or error}") from error
            raise RuntimeError(f"writing metrics failed in the background writer: {error!r}") from error
