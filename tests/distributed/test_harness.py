"""The multi-process helper itself: values come back, failures name the rank, hangs are killed."""

from __future__ import annotations

import time

import pytest
from harness import DistributedFailure, run_distributed, run_distributed_results


def _ok(rank: int, world_size: int, base: int) -> tuple[int, int, int]:
    import torch.distributed as dist

    return rank, dist.get_world_size(), base + rank


def _fails_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("bad thing on purpose")


def _hangs_on_one(rank: int, world_size: int) -> str:
    if rank == 0:
        time.sleep(60)
    return "done"


def test_values_in_rank_order():
    assert run_distributed(_ok, 2, 10, timeout=30) == [(0, 2, 10), (1, 2, 11)]


def test_exception_names_rank_and_traceback():
    with pytest.raises(DistributedFailure, match=r"(?s)rank 1 raised:\nValueError: bad thing on purpose.*"
                                                 r"_fails_on_one"):
        run_distributed(_fails_on_one, 2, timeout=30)


def test_hang_is_killed_at_the_timeout():
    start = time.monotonic()
    results = run_distributed_results(_hangs_on_one, 2, timeout=3, pg_timeout_s=30)
    assert time.monotonic() - start < 10
    assert results[0].exitcode is None and "still running at the timeout" in results[0].describe()
    assert results[1].ok and results[1].value == "done"
