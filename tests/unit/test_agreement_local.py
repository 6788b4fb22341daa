"""agreement helpers without processes: digests, failure classification, watchdog conversion."""

from __future__ import annotations

import pytest
import torch

from moe_dist.config import ParallelConfig
from moe_dist.distributed.agreement import (
    CollectiveTimeoutError,
    CollectiveWatchdog,
    agree_on,
    collective_timeout,
    is_collective_failure,
    model_signature,
    run_digest,
    stable_hash,
)
from moe_dist.distributed.comms import CollectiveRecord


def test_digests_are_stable_and_sensitive():
    assert stable_hash({"a": 1, "b": [2, 3]}) == stable_hash({"b": [2, 3], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    torch.manual_seed(0)
    a = model_signature(torch.nn.Linear(4, 4))
    torch.manual_seed(1)
    assert model_signature(torch.nn.Linear(4, 4)) == a  # values do not matter
    assert model_signature(torch.nn.Linear(4, 5)) != a
    assert model_signature(torch.nn.Linear(4, 4).to(torch.float64)) != a
    digest = run_digest({"x": 1}, torch.nn.Linear(2, 2), ep=4)
    assert set(digest) == {"config", "torch", "model", "ep"} and digest["ep"] == "4"


def test_single_process_agreement_and_timeout():
    agree_on({"config": "abc"}, None)  # nothing to disagree with
    assert collective_timeout(ParallelConfig(collective_timeout_s=12.5)).total_seconds() == 12.5


def test_failure_classification():
    record = CollectiveRecord()
    assert not is_collective_failure(ValueError("bad shape"), record)
    assert is_collective_failure(RuntimeError("[gloo/pair.cc:537] Connection closed by peer"), record)
    record.in_flight = True
    assert is_collective_failure(ValueError("anything"), record)


def test_watchdog_converts_collective_errors_and_passes_others():
    record = CollectiveRecord(name="all_to_all", group_ranks=[0, 1], input_splits=[2, 0],
                              output_splits=[1, 1], shape=(2, 8), count=3, in_flight=True)
    watchdog = CollectiveWatchdog(timeout_s=5.0, record=record, rank=1, exit_on_failure=False)
    with pytest.raises(CollectiveTimeoutError,
                       match=r"rank 1: step did not complete.*collective_timeout_s=5s.*"
                             r"input_splits \[2, 0\], output_splits \[1, 1\].*Cause: RuntimeError: boom"):
        with watchdog.guard():
            raise RuntimeError("boom\nsecond line")
    record.in_flight = False
    with pytest.raises(KeyError):
        with watchdog.guard():
            raise KeyError("not a collective")
    with pytest.raises(ValueError, match="timeout_s"):
        CollectiveWatchdog(timeout_s=0, record=record, rank=0)
