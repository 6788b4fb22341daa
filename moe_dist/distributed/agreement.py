"""Hang protection: agree before the first step, and fail in bounded time when a collective stalls.

Two mechanisms:

1. :func:`agree_on`. Before the first step every rank all-gathers a small digest, a dict of
   short strings such as the config hash and the parameter names/shapes/dtypes hash. If any
   key differs, *every* rank raises the same :class:`AgreementError`, naming the key and which
   ranks hold which value. Ranks that disagree would otherwise issue different collectives and
   hang.
2. :class:`CollectiveWatchdog`. Every process group is created with
   ``timeout=parallel.collective_timeout_s`` (see :func:`collective_timeout`). gloo then fails a
   blocked send/recv after that long, and a dead peer fails it at once ("Connection closed by
   peer"). NCCL's own watchdog aborts after the same timeout. ``watchdog.guard()`` turns either
   failure into a :class:`CollectiveTimeoutError` whose message includes the last split sizes
   from the caller-owned :class:`~moe_dist.distributed.comms.CollectiveRecord`. A timer thread
   also covers hangs that no backend timeout sees (a rank stuck before its collective, an
   un-timed op): at ``timeout + grace`` it prints the same message and exits the process.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from moe_dist.config import ParallelConfig
from moe_dist.distributed.comms import CollectiveRecord, all_gather_object, world_group
from moe_dist.distributed.param_tags import is_whole_expert

if TYPE_CHECKING:
    from moe_dist.config import Config
    from moe_dist.distributed.mesh import ParallelMesh

logger = logging.getLogger(__name__)

WATCHDOG_EXIT_CODE = 75
"""Exit status of a process the watchdog timer ended (distinct from Python's 1)."""


class AgreementError(RuntimeError):
    """Ranks hold different configs or model shapes; raised identically on every rank."""


class CollectiveTimeoutError(RuntimeError):
    """A collective failed or did not finish within the timeout (a peer died or hung)."""


# --------------------------------------------------------------------------------------------
# Digests and agreement
# --------------------------------------------------------------------------------------------

def stable_hash(obj: Any) -> str:
    """Short sha256 of a JSON-serialisable object (keys sorted), equal across processes."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_signature(model: nn.Module) -> str:
    """Hash of every parameter and buffer name, shape and dtype (values excluded).

    Whole experts (``param_tags.is_whole_expert``: one ep rank holds each, e.g. HMoE's) enter by
    name only, together with the names their modules list as held elsewhere
    (``state_names_elsewhere()``), so every rank hashes the same global set of names."""
    items, whole = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if is_whole_expert(t):
            whole.add(name)
        else:
            items.append((name, list(t.shape), str(t.dtype)))
    for fqn, module in model.named_modules():
        if hasattr(module, "state_names_elsewhere"):
            whole.update(f"{fqn}.{n}" if fqn else n for n in module.state_names_elsewhere())
    return stable_hash(items + sorted(whole)) if whole else stable_hash(items)


def run_digest(config_dict: dict[str, Any], model: nn.Module | None = None,
               **extra: Any) -> dict[str, str]:
    """The usual digest: config hash, model signature, torch version, plus any `extra` values."""
    digest = {"config": stable_hash(config_dict), "torch": torch.__version__}
    if model is not None:
        digest["model"] = model_signature(model)
    digest.update({k: str(v) for k, v in extra.items()})
    return digest


def agree_on(digest: dict[str, str], group: ProcessGroup | None,
             record: CollectiveRecord | None = None) -> None:
    """All-gather `digest` over `group` and raise AgreementError on every rank if any key differs.

    ``group=None`` (one process) checks nothing. Pass ``torch.distributed.group.WORLD`` to agree
    across the whole job. The message names each differing key with the ranks behind each
    value, e.g. ``'model': ranks [0, 1] have 'ab12..', rank [2] has 'cd34..'``.
    """
    digests = all_gather_object(dict(digest), group, record)
    if group is None:
        return
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group)
    keys = sorted(set().union(*(d.keys() for d in digests)))
    problems = []
    for key in keys:
        by_value: dict[str, list[int]] = {}
        for rank, d in zip(ranks, digests):
            by_value.setdefault(d.get(key, "<missing>"), []).append(rank)
        if len(by_value) > 1:
            held = ", ".join(f"ranks {r} have {v!r}" for v, r in sorted(by_value.items(), key=lambda kv: kv[1]))
            problems.append(f"{key!r}: {held}")
    if problems:
        raise AgreementError("ranks disagree before the first step (they would run different "
                             "collectives and hang): " + "; ".join(problems)
                             + ". Start every rank with the same config, code and overrides.")


def agree_before_training(model: nn.Module, cfg: Config, mesh: ParallelMesh,
                          record: CollectiveRecord | None = None) -> None:
    """Every rank of the job agrees on the config, the (parallelized) model's parameter
    names/shapes/dtypes, the mesh layout and the torch version; raises AgreementError if not."""
    agree_on(run_digest(cfg.to_dict(), model, layout=mesh.layout), world_group(), record)


# --------------------------------------------------------------------------------------------
# Timeouts and the watchdog
# --------------------------------------------------------------------------------------------

def collective_timeout(parallel: ParallelConfig) -> datetime.timedelta:
    """The process-group timeout for ``init_process_group(timeout=...)``."""
    return datetime.timedelta(seconds=parallel.collective_timeout_s)


_COMM_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset",
                 "broken pipe", "watchdog")


def is_collective_failure(exc: BaseException, record: CollectiveRecord | None) -> bool:
    """True when `exc` came from a collective: one was in flight, or torch says so."""
    import torch.distributed as dist

    if record is not None and record.in_flight:
        return True
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COMM_MARKERS)


class CollectiveWatchdog:
    """Bounds how long one guarded region (a training step) may block in collectives.

    ``timeout_s`` should equal the process-group timeout. ``exit_on_failure`` True (training)
    prints the message and ends the process with a non-zero status so the launcher tears the
    job down; False (tests, callers that clean up) raises CollectiveTimeoutError instead.
    """

    def __init__(self, timeout_s: float, record: CollectiveRecord, rank: int, *,
                 exit_on_failure: bool = True, grace_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout_s ({timeout_s}) must be positive")
        self.timeout_s = timeout_s
        self.record = record
        self.rank = rank
        self.exit_on_failure = exit_on_failure
        self.grace_s = grace_s

    def message(self, what: str, elapsed_s: float, cause: str) -> str:
        return (f"rank {self.rank}: {what} did not complete: a collective failed or exceeded "
                f"parallel.collective_timeout_s={self.timeout_s:g}s after {elapsed_s:.1f}s. "
                f"{self.record.summary()}. Cause: {cause}. Another rank probably died or is "
                "stuck; check the first error in the other ranks' logs.")

    def _exit(self, message: str) -> None:
        if logger.hasHandlers():  # else logging's last-resort handler would print it twice
            logger.error(message)
        print(f"[moe_dist watchdog] {message}", file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT_CODE)

    @contextmanager
    def guard(self, what: str = "step") -> Iterator[None]:
        """Run a region of collectives under the watchdog."""
        start = time.monotonic()

        def expire() -> None:
            self._exit(self.message(what, time.monotonic() - start,
                                    f"no progress for timeout + grace ({self.grace_s:g}s)"))

        timer = threading.Timer(self.timeout_s + self.grace_s, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception as exc:
            if not is_collective_failure(exc, self.record):
                raise
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            message = self.message(what, time.monotonic() - start,
                                   f"{type(exc).__name__}: {first_line[:300]}")
            if self.exit_on_failure:
                self._exit(message)
            raise CollectiveTimeoutError(message) from exc
        finally:
            timer.cancel()
