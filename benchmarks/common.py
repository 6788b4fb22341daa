"""Shared pieces of the benchmarks: device choice, timing, JSON lines, one-process groups.

Every benchmark prints one JSON object per result on stdout (and nothing else there; logs go
to stderr), so a run can be collected with ``grep '^{'`` and tabulated by ``summarize.py``.
Timing: device events around each phase, after warm-up, median over the timed iterations (a
host clock plus synchronisation on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_repeats(args, warmup: int, iters: int) -> None:
    """Fill ``args.warmup``/``args.iters`` left unset: the given counts at real sizes, 1 and 2
    with ``--tiny`` (CPU tests)."""
    if args.warmup is None:
        args.warmup = 1 if args.tiny else warmup
    if args.iters is None:
        args.iters = 2 if args.tiny else iters


def emit(record: dict) -> None:
    """One result as one JSON line on stdout."""
    print(json.dumps(record, sort_keys=True), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class DeviceClock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3


@dataclass
class Timing:
    fwd_ms: float
    bwd_ms: float
    peak_mem_gib: float

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


def time_fwd_bwd(forward: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int,
                 zero_grad: Callable[[], None] | None = None) -> Timing:
    """Median forward and backward times of ``forward().backward(...)``.

    ``forward`` returns the output; the backward is driven by a fixed random upstream gradient
    of the same shape (made once, outside the timed region).
    """
    clock = DeviceClock(device)
    grad_out = None
    for _ in range(warmup):
        if zero_grad:
            zero_grad()
        out = forward()
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fwd, bwd = [], []
    marks = []
    for _ in range(iters):
        if zero_grad:
            zero_grad()
        t0 = clock.mark()
        out = forward()
        t1 = clock.mark()
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        t2 = clock.mark()
        marks.append((t0, t1, t2))
        del out
    sync(device)
    for t0, t1, t2 in marks:
        fwd.append(clock.elapsed_ms(t0, t1))
        bwd.append(clock.elapsed_ms(t1, t2))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return Timing(statistics.median(fwd), statistics.median(bwd), peak)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()``."""
    clock = DeviceClock(device)
    for _ in range(warmup):
        fn()
    sync(device)
    marks = []
    for _ in range(iters):
        t0 = clock.mark()
        fn()
        marks.append((t0, clock.mark()))
    sync(device)
    return statistics.median(clock.elapsed_ms(a, b) for a, b in marks)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_sync_sites(fn: Callable[[], object], device: torch.device) -> list[str] | None:
    """'file:line' of each device-to-host sync ``fn()`` makes, as CUDA's
    ``set_sync_debug_mode("warn")`` reports them (None off CUDA). The mode's own "prototype
    feature" notice, which it emits the first time it is switched on, is not a sync."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return [f"{w.filename}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message).lower()]


def count_host_syncs(fn: Callable[[], object], device: torch.device, label: str) -> int | None:
    """How many device-to-host syncs ``fn()`` makes (:func:`host_sync_sites`; None off CUDA); the
    first few are logged with ``label``."""
    sites = host_sync_sites(fn, device)
    if sites is None:
        return None
    for site in sites[:5]:
        log(f"[{label}] host sync at {site}")
    return len(sites)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(device: torch.device) -> None:
    """A world of one (megatron-core and DeepSpeed need an initialised default group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            **({"device_id": torch.device("cuda", torch.cuda.current_device())}
                               if device.type == "cuda" else {}))


@contextlib.contextmanager
def reference_kernels_only():
    """Run moe_dist on its plain torch path (the Triton fast paths switched off)."""
    from moe_dist.moe import experts
    from moe_dist.moe.dispatch import permutation as dispatch
    from moe_dist.moe.routing import top_k as router

    saved = dispatch.use_fast_kernels, experts._use_fast_kernels, router.use_fast_kernels
    off = lambda t: False  # noqa: E731
    dispatch.use_fast_kernels = experts._use_fast_kernels = router.use_fast_kernels = off
    try:
        yield
    finally:
        dispatch.use_fast_kernels, experts._use_fast_kernels, router.use_fast_kernels = saved


def error_record(base: dict, exc: BaseException) -> dict:
    return {**base, "status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
