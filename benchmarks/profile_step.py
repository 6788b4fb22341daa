"""Where the time of a training step goes, by kernel category: the ~1B MoE step against the dense
step of the same active parameters (``benchmarks/train_step.py``'s models), compiled.

For each model: build with ``train_step.build_setup``, warm up (compiles), time the step without
the profiler (``time_call``), then run ``--steps`` steps under ``torch.profiler``. Each device
kernel (CUDA) or each operator's self time (CPU, ``--tiny``) goes to one category by its name
(:func:`categorize`): grouped GEMM, dense GEMM, attention, routing/permute, SwiGLU, cross-entropy,
optimizer (AdamW and the grad-norm kernels), elementwise/norm, memcpy/memset, other. On CUDA,
``idle/host`` is the device time inside the profiled steps when no kernel ran: the span from the
first kernel's start to the last kernel's end, less the union of the kernel intervals (launch
gaps, host work, syncs). On CPU it is the wall time less the operators' self times (Python and
framework overhead). The profiler adds host overhead per launch, so ``idle/host`` is an upper
bound of the unprofiled step's; the unprofiled step time is reported beside it.

Output: one JSON line per category with milliseconds per step for each model, the MoE - dense
gap and each model's share, then a text table and the top kernels per model on stderr.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import emit, gpu_name, log, pick_device, sync, time_call
from benchmarks.train_step import (COMPILE_MODES, FULL, TINY, add_grouped_gemm_arg, add_optimizer_arg, build_setup,
                                   compile_mode_label)

IDLE = "idle/host"
# First match wins, so the specific names come before the generic ones (a grouped CUTLASS GEMM
# before "cutlass", the embedding's backward before "scatter", moe_dist's grouped GEMMs with the
# SwiGLU epilogue, grouped_*swiglu*, before "swiglu").
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("cross-entropy", ("ce_forward_kernel", "ce_backward_kernel", "cross_entropy", "nll_loss", "log_softmax")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach", "optimizer", "lpnorm", "clip_grad")),
    ("grouped GEMM", ("grouped", "groupproblemshape", "group_gemm", "ptrarray")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("elementwise/norm", ("embedding",)),
    # moe_dist's Triton routing kernels, torch's sort/top-k/scatter (not "permute": Inductor names
    # its transposes after aten.permute).
    ("routing/permute", ("softmax_topk", "gather_rows", "gather_sum", "scatter_grad", "zero_rows",
                         "topk", "sort", "radix", "scatter", "bincount", "cumsum", "index_add", "histc",
                         "index_select", "index_put")),
    ("SwiGLU", ("swiglu",)),
    ("dense GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "triton_tem_fused_mm",
                    "triton_tem_fused_addmm", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("elementwise/norm", ("triton_poi", "triton_red", "triton_per", "elementwise", "vectorized", "reduce",
                          "norm", "rsqrt", "silu", "mul", "add", "copy", "fill", "cast", "pow", "mean", "cat",
                          "rotary", "where", "clone", "neg", "exp", "div", "sum", "sqrt")),
]
ORDER = ["grouped GEMM", "dense GEMM", "attention", "routing/permute", "SwiGLU", "elementwise/norm",
         "optimizer", "cross-entropy", "memcpy/memset", "other", IDLE]


def categorize(name: str) -> str:
    """The category of a kernel or operator name (case-insensitive substring match)."""
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(pattern in lowered for pattern in patterns):
            return category
    return "other"


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def device_breakdown(prof, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(ms per step per category, ms per step per kernel name) from the CUDA kernels."""
    per_category: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    intervals = []
    for event in prof.events():
        # record_function ranges (e.g. "Optimizer.step#AdamW.step") are mirrored onto the GPU
        # timeline as annotations that span their kernels; counting them counts those kernels twice.
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        start, end = event.time_range.start, event.time_range.end
        intervals.append((start, end))
        per_category[categorize(event.name)] += (end - start) / 1e3
        per_kernel[event.name] += (end - start) / 1e3
    if intervals:
        span = max(e for _, e in intervals) - min(s for s, _ in intervals)
        per_category[IDLE] = (span - union_us(intervals)) / 1e3
    return ({k: v / steps for k, v in per_category.items()}, {k: v / steps for k, v in per_kernel.items()})


def host_breakdown(prof, steps: int, wall_ms: float) -> tuple[dict[str, float], dict[str, float]]:
    """The same from the operators' self CPU times (no device: the CPU runs the kernels)."""
    per_category: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for average in prof.key_averages():
        if average.key.startswith("ProfilerStep"):
            continue
        ms = average.self_cpu_time_total / 1e3
        per_category[categorize(average.key)] += ms
        per_op[average.key] += ms
    per_category[IDLE] = max(wall_ms - sum(per_category.values()), 0.0)
    return ({k: v / steps for k, v in per_category.items()}, {k: v / steps for k, v in per_op.items()})


def profile_model(kind: str, size: dict, args, device: torch.device) -> dict:
    """Categories (ms per step), top kernels and the unprofiled step time of one model."""
    mode = None if args.compile_mode == "eager" else args.compile_mode
    setup = build_setup(kind, size, device, args.optimizer, mode, grouped_gemm=args.grouped_gemm,
                        optimizer_state_dtype=args.optimizer_state_dtype)
    step_ms = time_call(setup.step, device, warmup=args.warmup, iters=args.iters)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            setup.step()
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        categories, kernels = device_breakdown(prof, args.steps)
    else:
        categories, kernels = host_breakdown(prof, args.steps, wall_ms)
    del setup
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms": step_ms, "profiled_ms": wall_ms / args.steps, "categories": categories, "kernels": kernels}


def text_table(rows: list[dict], models: list[str]) -> str:
    head = ["category"] + [f"{m} ms" for m in models] + ([f"gap ms ({models[0]} - {models[1]})"]
                                                        if len(models) == 2 else [])
    lines = [" | ".join(f"{h:>22}" for h in head)]
    for row in rows:
        cells = [row["category"]] + [_fmt(row.get(f"{m}_ms")) for m in models]
        if len(models) == 2:
            cells.append(_fmt(row.get("gap_ms")))
        lines.append(" | ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def _one_line(name: str) -> str:
    return re.sub(r"\s+", " ", name)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models (tests)")
    parser.add_argument("--models", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES + ["eager"])
    add_optimizer_arg(parser)
    add_grouped_gemm_arg(parser)
    parser.add_argument("--steps", type=int, default=None, help="profiled steps per model")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="unprofiled timed steps")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per model on stderr")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.iters = args.iters or (2 if args.tiny else 5)
    device = pick_device()
    size = TINY if args.tiny else FULL
    profiles = {}
    for kind in args.models:
        try:
            profiles[kind] = profile_model(kind, size, args, device)
        except Exception as exc:  # one model failing must not hide the other
            log(f"[profile_step] {kind} failed: {exc!r}")
    models = [m for m in args.models if m in profiles]
    mode = None if args.compile_mode == "eager" else args.compile_mode
    base = {"bench": "profile_step", "system": "moe_dist" + compile_mode_label(mode),
            "compile_mode": args.compile_mode, "steps": args.steps, "device": gpu_name(device)}
    summary_rows = [("step (unprofiled)", "step_ms"), ("step (profiled, wall)", "profiled_ms")]
    records = []
    for label, key in summary_rows:
        records.append({**base, "category": label, **{f"{m}_ms": round(profiles[m][key], 3) for m in models}})
    kernel_total = {m: sum(v for k, v in profiles[m]["categories"].items() if k != IDLE) for m in models}
    records.append({**base, "category": "kernels (sum)", **{f"{m}_ms": round(kernel_total[m], 3) for m in models}})
    for category in ORDER:
        record = {**base, "category": category}
        for m in models:
            ms = profiles[m]["categories"].get(category, 0.0)
            record[f"{m}_ms"] = round(ms, 3)
            record[f"{m}_share"] = round(ms / profiles[m]["profiled_ms"], 4)
        records.append(record)
    if len(models) == 2:
        for record in records:
            record["gap_ms"] = round(record[f"{models[0]}_ms"] - record[f"{models[1]}_ms"], 3)
    for record in records:
        emit(record)
    log(f"[profile_step] ms per step, {args.compile_mode} compile, {args.steps} profiled steps:\n"
        + text_table(records, models))
    for m in models:
        top = sorted(profiles[m]["kernels"].items(), key=lambda kv: -kv[1])[:args.top]
        log(f"[profile_step] top kernels, {m} (ms per step, category):\n" + "\n".join(
            f"  {ms:8.3f}  {categorize(name):>16}  {_one_line(name)[:140]}" for name, ms in top))
    return records


if __name__ == "__main__":
    main()
