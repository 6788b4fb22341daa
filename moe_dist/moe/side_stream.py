"""Run part of a layer on a side CUDA stream, concurrently with the caller's (current) stream.

The MoE layer starts its shared experts here before routing, so on one GPU they run while the
router, the permutation and the routed experts run on the current stream (and, under expert
parallelism, while the all-to-alls are in flight). The math is the same as calling ``fn(x)``
inline; only the stream differs.

Stream rules followed (torch "CUDA semantics", streams and the caching allocator):

* fork: the side stream waits for the current stream, so ``x`` is complete before it is read;
  ``x.record_stream(side)`` keeps ``x``'s memory from being reused while the side stream may
  still read it, should the caller drop ``x`` first;
* join (:meth:`SideWork.join`): the current stream waits for the side stream, and the result,
  allocated on the side stream, is recorded on the current stream that reads it;
* backward: autograd runs every backward op on the stream of its forward op and synchronises the
  streams where a gradient crosses from one to the other (the shared experts' backward runs on
  the side stream, concurrently with the routed experts' backward), so nothing more is needed.

No host synchronisation anywhere (``tests/gpu/test_dispatch_overlap_gpu.py`` runs it under
``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
"""One side stream per device, shared by every layer (the layers run one after the other)."""


def side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def can_use_side_stream(x: torch.Tensor) -> bool:
    """A CUDA tensor in eager mode: ``torch.compile`` traces one stream, so a compiled layer
    computes everything in order (Inductor schedules it)."""
    return x.is_cuda and not torch.compiler.is_compiling()


@dataclass
class SideWork:
    """``fn(x)`` issued on a side stream; :meth:`join` before using the result."""

    result: torch.Tensor
    stream: torch.cuda.Stream

    def join(self) -> torch.Tensor:
        current = torch.cuda.current_stream(self.result.device)
        current.wait_stream(self.stream)
        self.result.record_stream(current)
        return self.result


def start_on_side_stream(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> SideWork:
    """Issue ``fn(x)`` on the device's side stream and return without waiting (CUDA only)."""
    stream = side_stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        result = fn(x)
    x.record_stream(stream)
    return SideWork(result, stream)
