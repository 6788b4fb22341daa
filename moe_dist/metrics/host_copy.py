"""A device-to-host copy that the caller collects later instead of waiting for it now.

At a logging step the trainer stages everything it must read (the window's loss means, the
expert-load counters) in device tensors, starts their copies to pinned host memory and records
an event. It reads them at the next logging step: by then the device has long finished that
work, so the read costs no idle device time, while a blocking ``.cpu()`` at the logging step
would drain the queue the host has built ahead of the device. On CPU the copy is immediate.
"""

from __future__ import annotations

import numpy as np
import torch


class PendingHostCopy:
    """Copies of ``tensors`` on their way to the host; :meth:`wait` returns them as arrays."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, device in zip(self._host, tensors):
                host.copy_(device.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = [t.detach().clone() for t in tensors]

    def wait(self) -> list[np.ndarray]:
        if self._event is not None:
            # NOTE: waits for this copy only; work queued after it keeps the device busy.
            self._event.synchronize()
        return [host.numpy() for host in self._host]
