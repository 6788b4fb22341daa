"""Multi-process test helper: run ``fn(rank, world_size, *args)`` on N gloo ranks.

Usage from a test::

    from harness import run_distributed

    def _body(rank, world_size, n):       # module level, so 'spawn' can pickle it
        ...
        return something_picklable

    def test_x():
        results = run_distributed(_body, 4, 3, timeout=30)   # results[rank]

Processes start through torch.multiprocessing (start method 'forkserver', see START_METHOD).
Each process: sets OMP_NUM_THREADS=1, initialises gloo over ``tcp://127.0.0.1:<free port>``
with a short collective timeout, runs fn, then barrier + destroy. Any exception is sent back
with its rank and traceback and re-raised in pytest as :class:`DistributedFailure`; a process
still alive at ``timeout`` is killed and reported. Start processes once per test and do several
checks inside fn: a spawn costs about a second per rank on 2 cores.
"""

from __future__ import annotations

import datetime
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp

from moe_dist.distributed.launch_env import free_port


START_METHOD = "forkserver"
"""Like 'spawn', every rank starts from a fresh single-threaded server process that inherited
nothing from pytest's state; unlike 'spawn', that server imports torch once per pytest session
and forks each rank from it, so starting 4 ranks costs ~0.1 s instead of ~10 s on 2 cores."""
PRELOAD = ["torch", "torch.distributed", "torch.distributed.device_mesh", "moe_dist.config",
           "moe_dist.distributed.comms", "moe_dist.distributed.mesh"]


class DistributedFailure(AssertionError):
    """One or more ranks failed, exited abnormally or timed out."""


@dataclass
class RankResult:
    rank: int
    ok: bool = False
    """fn returned."""
    value: Any = None
    error: str | None = None
    """'<ExceptionType>: message' plus the traceback, from fn or from teardown."""
    exitcode: int | None = None
    """Process exit code (None: killed at the timeout)."""

    def describe(self) -> str:
        if self.error:
            return f"rank {self.rank} raised:\n{self.error}"
        if self.exitcode is None:
            return f"rank {self.rank} was still running at the timeout and was killed"
        return f"rank {self.rank} exited with code {self.exitcode} without a result"


def _worker(rank: int, world_size: int, port: int, pg_timeout_s: float, fn: Callable[..., Any],
            args: tuple[Any, ...], results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to pytest
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        # Do not wait for peers in teardown: they may be blocked on us.
        results.close()
        results.join_thread()
        os._exit(1)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        results.put((rank, "teardown", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()
        os._exit(1)


def run_distributed_results(fn: Callable[..., Any], world_size: int, *args: Any,
                            timeout: float = 60.0, pg_timeout_s: float = 30.0) -> list[RankResult]:
    """Run fn on every rank and return what happened to each (never raises for a rank's failure)."""
    ctx = mp.get_context(START_METHOD)
    ctx.set_forkserver_preload(PRELOAD)  # only takes effect before the server's first start
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, pg_timeout_s, fn, args, results),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out = [RankResult(rank=r) for r in range(world_size)]
    deadline = time.monotonic() + timeout

    def drain(block_s: float) -> None:
        try:
            rank, kind, payload = results.get(timeout=block_s)
        except queue.Empty:
            return
        if kind == "ok":
            out[rank].ok, out[rank].value = True, payload
        else:
            out[rank].error = payload

    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        drain(0.05)
    killed = [p.is_alive() for p in procs]
    for p, kill in zip(procs, killed):
        if kill:
            p.kill()
        p.join(5)
    # Results put just before a process exited may still be in the pipe.
    while not results.empty():
        drain(0.2)
    for r, p in enumerate(procs):
        out[r].exitcode = None if killed[r] else p.exitcode
    results.close()
    return out


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
                    pg_timeout_s: float = 30.0) -> list[Any]:
    """Run fn on every rank; return the per-rank values or raise DistributedFailure naming ranks."""
    out = run_distributed_results(fn, world_size, *args, timeout=timeout, pg_timeout_s=pg_timeout_s)
    failed = [r for r in out if not r.ok or r.error or r.exitcode != 0]
    if failed:
        raise DistributedFailure(f"{len(failed)} of {world_size} ranks failed:\n"
                                 + "\n".join(r.describe() for r in failed))
    return [r.value for r in out]
