"""docs/launching.md, multi-node section: the watchdog message it quotes is the one moe_dist
prints, the settings it names are there, and the numbers it states match the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from moe_dist.config.run import ParallelConfig
from moe_dist.distributed.agreement import WATCHDOG_EXIT_CODE, CollectiveWatchdog
from moe_dist.distributed.comms import CollectiveRecord
from tests.unit.test_docs import produced_by_source

LAUNCHING = Path(__file__).resolve().parents[2] / "docs" / "launching.md"


def _section() -> str:
    text = LAUNCHING.read_text()
    start = text.index("## Multi-node: NCCL, InfiniBand and hangs")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_quoted_watchdog_line_is_what_the_watchdog_prints():
    record = CollectiveRecord()
    splits_in = [1530, 1498, 1611, 1570, 1502, 1547, 1589, 1441]
    record.name, record.shape, record.group_ranks = "all_to_all", (sum(splits_in), 4096), list(range(8))
    record.input_splits, record.output_splits = splits_in, [1524, 1556, 1611, 1480, 1533, 1601, 1492, 1515]
    record.count, record.in_flight = 48211, True
    watchdog = CollectiveWatchdog(600, record, rank=2)
    cause = f"no progress for timeout + grace ({watchdog.grace_s:g}s)"  # the timer's cause, as guard() words it
    line = "[moe_dist watchdog] " + watchdog.message("training step 1201", 630.0, cause)
    quoted = [candidate.strip() for candidate in _section().splitlines()]
    assert line in quoted, f"docs/launching.md does not quote the watchdog line as it is printed:\n{line}"


def test_every_quoted_moe_dist_line_is_produced_by_the_source():
    quoted = [line.strip() for line in _section().splitlines() if line.strip().startswith("[moe_dist watchdog]")]
    assert quoted
    for line in quoted:
        assert produced_by_source(line), line
    assert not produced_by_source(quoted[0].replace("did not complete", "did not finish"))


def test_section_names_the_settings_and_matches_the_code():
    section = _section()
    for name in ("NCCL_DEBUG", "NCCL_DEBUG_FILE", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                 "parallel.collective_timeout_s"):
        assert f"`{name}" in section or f"{name}=" in section, name
    default_timeout = ParallelConfig().collective_timeout_s
    assert f"`parallel.collective_timeout_s` (default {default_timeout:g} s)" in section
    grace = inspect.signature(CollectiveWatchdog).parameters["grace_s"].default
    assert f"after `timeout + {grace:g} s`" in section
    assert f"exit status {WATCHDOG_EXIT_CODE}" in section
    assert re.search(r"guide/troubleshooting\.md#hangs-timeouts-and-dead-ranks", section)
