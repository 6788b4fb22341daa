"""Tabulate benchmark JSON lines (stdin or files) as Markdown tables, one per benchmark.

Rows keep their input order within a benchmark. Two columns are derived, each from the nearest
row (in input order) of the same run that it is compared with:

* ``moe_layer`` ``vs_dense``: the row's TFLOP/s over the ``dense_gemm`` row of the same shape
  (1.0 on that row itself; the issue-19 targets: >= 95% Mixtral, >= 85% fine-grained, >= 65%
  Qwen3-like);
* ``train_step`` ``vs_dense``: the row's tokens/s over the dense model's row of the same system
  (the same compile mode and kernel path; ``--grouped-gemm triton_fused`` changes only the MoE
  model, so its ``_triton_fused`` rows compare with the dense row without that tag).
"""

from __future__ import annotations

import fileinput
import json
from collections.abc import Callable, Iterable

COLUMNS = {
    "moe_layer": ["shape", "system", "status", "fwd_ms", "bwd_ms", "total_ms", "tflops", "vs_dense", "peak_mem_gib"],
    "dispatch": ["shape", "system", "status", "routing_fwd_ms", "routing_bwd_ms", "layer_fwd_ms", "layer_bwd_ms",
                 "share", "routing_kernel_ms", "share_kernel", "host_syncs"],
    "train_step": ["model", "system", "optimizer", "status", "params_m", "active_params_m", "step_ms",
                   "tokens_per_s", "vs_dense", "tflops", "mfu", "mfu_measured_peak", "peak_mem_gib",
                   "cudagraph_skips"],
    "dispatch_bw": ["system", "world", "tokens", "hidden", "ms", "busbw_gbs", "fraction_of_bare"],
    "logging_cost": ["model", "system", "mode", "status", "steps", "median_step_ms", "mean_step_ms",
                     "relative_cost_pct", "relative_cost_pct_mean", "delta_ms", "host_syncs_per_log_step",
                     "logged_steps"],
    "profile_step": ["system", "category", "moe_ms", "dense_ms", "gap_ms", "moe_share", "dense_share"],
    "largest_model": ["status", "offload", "checkpointing", "micro_batch", "accum", "total_params", "active_params",
                      "step_s", "optimizer_s", "tokens_per_s", "tflops", "mfu", "peak_gpu_gib", "estimate_gpu_gib",
                      "host_peak_rss_gib", "estimate_host_gib", "setup_s"],
}


def _nearest(rows: list[dict], index: int, match: Callable[[dict], bool]) -> dict | None:
    candidates = [(abs(i - index), i) for i, row in enumerate(rows) if match(row)]
    return rows[min(candidates)[1]] if candidates else None


def _ratio(value, reference) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 3)


def add_derived(bench: str, rows: list[dict]) -> None:
    """Fill ``vs_dense`` in place (see the module docstring); None where no partner row ran."""
    for index, row in enumerate(rows):
        if row.get("status") != "ok":
            continue
        if bench == "moe_layer":
            dense = _nearest(rows, index, lambda r: r.get("shape") == row.get("shape")
                             and r.get("system") == "dense_gemm" and r.get("status") == "ok")
            row["vs_dense"] = _ratio(row.get("tflops"), dense and dense.get("tflops"))
        elif bench == "train_step" and row.get("model") != "dense":
            system = row.get("system", "").replace("_triton_fused", "")
            dense = _nearest(rows, index, lambda r: r.get("model") == "dense" and r.get("system") == system
                             and r.get("status") == "ok")
            row["vs_dense"] = _ratio(row.get("tokens_per_s"), dense and dense.get("tokens_per_s"))


def table(bench: str, rows: list[dict]) -> str:
    add_derived(bench, rows)
    cols = COLUMNS.get(bench) or sorted({k for r in rows for k in r})
    lines = [f"### {bench}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(str(v)[:60] if v is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(lines: Iterable[str]) -> str:
    by_bench: dict[str, list[dict]] = {}
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            by_bench.setdefault(record.get("bench", "?"), []).append(record)
    return "\n\n".join(table(b, rows) for b, rows in by_bench.items())


def main() -> None:
    print(summarize(fileinput.input()))


if __name__ == "__main__":
    main()
