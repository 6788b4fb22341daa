"""Tabulate benchmark JSON lines (stdin or files) as Markdown tables, one per benchmark."""

from __future__ import annotations

import fileinput
import json

COLUMNS = {
    "moe_layer": ["shape", "system", "status", "fwd_ms", "bwd_ms", "total_ms", "tflops", "peak_mem_gib"],
    "dispatch": ["shape", "system", "status", "routing_fwd_ms", "routing_bwd_ms", "layer_fwd_ms", "layer_bwd_ms",
                 "share", "routing_kernel_ms", "share_kernel", "host_syncs"],
    "train_step": ["model", "system", "optimizer", "status", "params_m", "active_params_m", "step_ms",
                   "tokens_per_s", "tflops", "mfu", "mfu_measured_peak", "peak_mem_gib"],
    "dispatch_bw": ["system", "world", "tokens", "hidden", "ms", "busbw_gbs", "fraction_of_bare"],
}


def table(bench: str, rows: list[dict]) -> str:
    cols = COLUMNS.get(bench) or sorted({k for r in rows for k in r})
    lines = [f"### {bench}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(str(v)[:60] if v is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    by_bench: dict[str, list[dict]] = {}
    for line in fileinput.input():
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            by_bench.setdefault(record.get("bench", "?"), []).append(record)
    print("\n\n".join(table(b, rows) for b, rows in by_bench.items()))


if __name__ == "__main__":
    main()
