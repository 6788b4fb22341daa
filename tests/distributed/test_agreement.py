"""Hang protection on gloo: config/shape agreement, dead and silent ranks fail in bounded time."""

from __future__ import annotations

import time

import torch
from harness import run_distributed, run_distributed_results

from moe_dist.distributed.agreement import WATCHDOG_EXIT_CODE

TIMEOUT_S = 2.0  # process-group timeout of the dead/silent-rank tests


def _agree(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from moe_dist.distributed.agreement import AgreementError, agree_on, run_digest

    out = {}
    model = torch.nn.Linear(4, 4)
    agree_on(run_digest({"moe": {"num_experts": 8}}, model), dist.group.WORLD)  # all equal: passes
    from moe_dist.config import Config
    from moe_dist.distributed.agreement import agree_before_training
    from moe_dist.distributed.mesh import build_mesh

    cfg = Config()
    agree_before_training(model, cfg, build_mesh(cfg.parallel, world_size, "cpu"))
    # Rank 1 has another config, rank 2 another model shape.
    cfg = {"moe": {"num_experts": 16 if rank == 1 else 8}}
    model = torch.nn.Linear(4, 6 if rank == 2 else 4)
    try:
        agree_on(run_digest(cfg, model), dist.group.WORLD)
    except AgreementError as exc:
        out["error"] = str(exc)
    return out


def test_mismatch_is_an_error_on_every_rank_naming_ranks():
    out = run_distributed(_agree, 3, timeout=60)
    messages = [o.get("error") for o in out]
    assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
    message = messages[0]
    assert "'config': ranks [0, 2] have" in message and "ranks [1] have" in message
    assert "'model': ranks [0, 1] have" in message and "ranks [2] have" in message
    assert "'torch'" not in message  # keys that agree are not reported


def _dead_peer(rank: int, world_size: int, silent: bool) -> dict:
    """Step 1 completes; before step 2 rank 1 dies (or, if `silent`, stalls, then exits)."""
    import os

    import torch.distributed as dist

    from moe_dist.distributed import comms
    from moe_dist.distributed.agreement import CollectiveTimeoutError, CollectiveWatchdog

    record = comms.CollectiveRecord()
    watchdog = CollectiveWatchdog(timeout_s=TIMEOUT_S, record=record, rank=rank, exit_on_failure=False)
    splits = [[1, 2], [3, 0]]
    x = torch.ones(3, 2)  # 3 rows on each rank
    with watchdog.guard("step 1"):
        comms.all_to_all(x, [splits[0][rank], splits[1][rank]], splits[rank], dist.group.WORLD, record)
    if rank == 1:
        if silent:
            time.sleep(TIMEOUT_S + 1.5)  # longer than rank 0's timeout
        os._exit(7)
    start = time.monotonic()
    try:
        with watchdog.guard("step 2"):
            comms.all_to_all(x, [1, 3], [1, 2], dist.group.WORLD, record)
    except CollectiveTimeoutError as exc:
        return {"elapsed": time.monotonic() - start, "message": str(exc)}
    return {"elapsed": time.monotonic() - start, "message": None}


def _check_rank0(results, max_s: float) -> dict:
    r0 = results[0]
    assert r0.ok, r0.describe()
    assert results[1].exitcode == 7, results[1].describe()
    value = r0.value
    assert value["message"] is not None, "rank 0 did not notice the dead peer"
    assert value["elapsed"] < max_s, value
    message = value["message"]
    assert message.startswith("rank 0: step 2 did not complete")
    assert "collective_timeout_s=2s" in message
    assert "all_to_all over ranks [0, 1], shape [3, 2], input_splits [1, 2], output_splits [1, 3]" in message
    assert "(unfinished)" in message
    return value


def test_dead_rank_fails_fast_with_split_sizes():
    results = run_distributed_results(_dead_peer, 2, False, timeout=30, pg_timeout_s=TIMEOUT_S)
    _check_rank0(results, max_s=TIMEOUT_S + 3.0)


def test_silent_rank_fails_after_the_timeout():
    results = run_distributed_results(_dead_peer, 2, True, timeout=30, pg_timeout_s=TIMEOUT_S)
    value = _check_rank0(results, max_s=TIMEOUT_S + 3.0)
    assert value["elapsed"] > TIMEOUT_S - 0.5, value  # gloo waited for the timeout, not less
    assert "timed out" in value["message"].lower()


def _stuck(rank: int, world_size: int) -> None:
    from moe_dist.distributed import comms
    from moe_dist.distributed.agreement import CollectiveWatchdog

    watchdog = CollectiveWatchdog(timeout_s=0.5, record=comms.CollectiveRecord(), rank=rank,
                                  grace_s=0.5)
    with watchdog.guard("stuck step"):
        time.sleep(20.0)  # nothing times out by itself here; the watchdog timer must end it


def test_watchdog_timer_ends_a_stuck_process():
    start = time.monotonic()
    results = run_distributed_results(_stuck, 2, timeout=30)
    assert [r.exitcode for r in results] == [WATCHDOG_EXIT_CODE] * 2, [r.describe() for r in results]
    assert time.monotonic() - start < 15
