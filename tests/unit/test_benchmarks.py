"""Each benchmark runs at --tiny size on CPU and prints well-formed JSON lines with numbers
that are consistent with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import dispatch as dispatch_bench
from benchmarks import moe_layer, train_step

REPO = Path(__file__).resolve().parents[2]


def _lines(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def no_deepspeed_shm_build():
    """DeepSpeed JIT-compiles a shared-memory comm op on its first CPU init (~40 s); the
    benchmark's single-process DeepSpeed layer never uses it."""
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    module = sys.modules["deepspeed.comm.torch"]  # not `import ... as`: that binds torch itself
    original = module.build_shm_op
    module.build_shm_op = lambda: None
    yield
    module.build_shm_op = original


def test_moe_layer_tiny(capsys, no_deepspeed_shm_build):
    results = moe_layer.main(["--tiny", "--systems", "dense_gemm", "moe_dist", "moe_dist_triton_fused",
                              "moe_dist_torch", "deepspeed",
                              "--iters", "1", "--warmup", "1"])
    assert _lines(capsys) == results
    ok = [r for r in results if r["status"] == "ok"]
    assert {(r["shape"], r["system"]) for r in ok} >= {
        ("mixtral_tiny", "moe_dist"), ("fine_grained_tiny", "moe_dist"), ("fine_grained_tiny", "dense_gemm"),
        ("qwen3_tiny", "moe_dist"), ("qwen3_tiny", "moe_dist_torch"), ("qwen3_tiny", "dense_gemm"),
        ("qwen3_tiny", "moe_dist_triton_fused")}
    shapes = {shape.name: shape for shape in moe_layer.TINY.values()}
    for r in ok:
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["total_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"], abs=2e-3)
        shape = shapes[r["shape"]]
        assert (r["experts"], r["top_k"], r["shared"]) == (shape.num_experts, shape.top_k, shape.num_shared)
        assert r["tflops"] == pytest.approx(shape.flops() / (r["total_ms"] * 1e-3) / 1e12, abs=0.06)
    for name in ("fine_grained_tiny", "qwen3_tiny"):  # top-8: DeepSpeed's MoE stops at top-2
        unsupported = [r for r in results if r["system"] == "deepspeed" and r["shape"] == name]
        assert unsupported[0]["status"].startswith("unsupported")


def test_moe_layer_qwen3_shape_and_same_work_dense():
    """The Qwen3-like row is h2048 f768 E128 top-8, no shared expert; its dense baseline runs the
    same T*K rows with an input gradient (the same work as the MoE layer's backward)."""
    import torch

    shape = moe_layer.SHAPES["qwen3"]
    assert (shape.hidden, shape.ffn, shape.num_experts, shape.top_k, shape.num_shared, shape.tokens) == (
        2048, 768, 128, 8, 0, 8192)
    assert shape.flops() == 6 * 8192 * 8 * 3 * 2048 * 768
    tiny = moe_layer.TINY["qwen3"]
    x = torch.randn(tiny.tokens, tiny.hidden)
    dense, _ = moe_layer.build_dense(tiny, x, torch.device("cpu"), torch.float32)
    assert dense.rows.shape == (tiny.tokens * tiny.top_k, tiny.hidden) and dense.rows.requires_grad
    assert (dense.mlp.w13.weight.shape, dense.mlp.w2.weight.shape) == ((2 * tiny.ffn, tiny.hidden),
                                                                       (tiny.hidden, tiny.ffn))


def test_moe_layer_flops_formula():
    shape = moe_layer.SHAPES["mixtral"]
    assert shape.flops() == 18 * 8192 * 2 * 4096 * 14336  # 6 x (K * 3 h f) per token


def test_dispatch_tiny(capsys):
    results = dispatch_bench.main(["--tiny", "--shapes", "fine_grained", "--iters", "1", "--warmup", "1"])
    assert _lines(capsys) == results
    for r in results:
        assert r["status"] == "ok"
        total = r["routing_fwd_ms"] + r["routing_bwd_ms"]
        assert r["share"] == pytest.approx(total / (r["layer_fwd_ms"] + r["layer_bwd_ms"]), rel=0.02)
        assert r["host_syncs"] is None  # counted on CUDA only


def test_train_step_tiny_bf16_moments(capsys):
    results = train_step.main(["--tiny", "--iters", "1", "--warmup", "1", "--optimizer-state-dtype", "bf16",
                               "--models", "moe"])
    assert _lines(capsys) == results
    assert results[0]["status"] == "ok" and results[0]["optimizer"] == "bf16_moments"
    from moe_dist.train.adamw_bf16_moments import AdamWBf16Moments

    setup = train_step.build_setup("moe", train_step.TINY, torch.device("cpu"), optimizer_state_dtype="bf16")
    assert isinstance(setup.optimizer, AdamWBf16Moments)


def test_train_step_tiny(capsys):
    results = train_step.main(["--tiny", "--iters", "1", "--warmup", "1", "--grouped-gemm", "triton_fused"])
    assert _lines(capsys) == results
    moe, dense = results
    assert moe["status"] == dense["status"] == "ok"
    assert (moe["system"], dense["system"]) == ("moe_dist_triton_fused", "moe_dist")  # the flag is the MoE's
    assert moe["params_m"] > dense["params_m"]
    assert moe["active_params_m"] == pytest.approx(dense["active_params_m"], rel=0.05)
    assert moe["tokens_per_s"] == pytest.approx(2 * 32 / (moe["step_ms"] * 1e-3), rel=0.01)


def test_train_step_full_size_counts():
    """The benchmarked models are what the docs say: ~0.95B total, ~0.33B active."""
    import torch

    from moe_dist.models.transformer import Transformer

    counts = {}
    for kind in ("moe", "dense"):
        model_cfg, moe_cfg = train_step.build(kind, train_step.FULL)
        with torch.device("meta"):
            counts[kind] = sum(p.numel() for p in Transformer(model_cfg, moe_cfg).parameters())
    assert 0.9e9 < counts["moe"] < 1.0e9
    assert 0.3e9 < counts["dense"] < 0.35e9


@pytest.mark.slow
def test_dispatch_bw_two_ranks_gloo():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "-m", "benchmarks.dispatch_bw", "--tiny"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["system"] for r in records] == ["moe_dist", "bare_all_to_all"]
    assert all(r["world"] == 2 and r["ms"] > 0 for r in records)
    # The fraction is rounded to 3 decimals: at tiny sizes it is small, so compare absolutely.
    assert records[0]["fraction_of_bare"] == pytest.approx(records[1]["ms"] / records[0]["ms"], abs=6e-4)


def test_logging_cost_tiny(capsys, tmp_path):
    """Both modes time the same number of steps; the logging mode really logged (one
    metrics.jsonl record and one text line per logging step, TensorBoard events) and the cost
    record is computed from the two medians."""
    from benchmarks import logging_cost

    results = logging_cost.main(["--tiny", "--warmup", "1", "--rounds", "2", "--block", "2",
                                 "--run-dir", str(tmp_path)])
    assert _lines(capsys) == results
    off, on, cost = results
    assert [off["mode"], on["mode"], cost["mode"]] == ["off", "every1", "cost"]
    assert off["steps"] == on["steps"] == 4
    for r in (off, on):
        assert r["status"] == "ok" and 0 < r["median_step_ms"] and 0 < r["mean_step_ms"]
    assert cost["relative_cost_pct"] == pytest.approx(100 * (on["median_step_ms"] / off["median_step_ms"] - 1),
                                                      abs=0.02)
    logging_steps = 1 + 4 + 1  # warm-up block, timed blocks, the step under the sync detector
    assert cost["logged_steps"] == cost["text_lines"] == logging_steps
    assert cost["tb_event_bytes"] > 0
    assert cost["host_syncs_per_log_step"] is None  # counted on CUDA only
    from moe_dist.metrics import read_metrics

    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert len(logged) == logging_steps
    last = logged[max(logged)]
    assert {"loss", "grad_norm", "tokens_per_s", "moe/layer_0/imbalance"} <= set(last)


@pytest.mark.parametrize("name, category", [
    ("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal<"
     "cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >, cutlass::gemm::collective::CollectiveMma<"
     "cutlass::gemm::MainloopSm90ArrayTmaGmmaWarpSpecialized<4>>>>>", "grouped GEMM"),
    ("triton_tem_fused__grouped_mm_3", "grouped GEMM"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "dense GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "dense GEMM"),
    ("aten::mm", "dense GEMM"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>", "attention"),
    ("softmax_topk_kernel", "routing/permute"),
    ("gather_sum_kernel", "routing/permute"),
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::DeviceRadixSortPolicy>",
     "routing/permute"),
    ("triton_poi_fused__unsafe_view_clone_permute_4", "elementwise/norm"),  # a transpose, not routing
    ("triton_poi_fused_embedding_dense_backward_2", "elementwise/norm"),
    ("swiglu_bwd_kernel", "SwiGLU"),
    ("grouped_gate_up_swiglu_kernel", "grouped GEMM"),  # moe_dist's GEMMs with the SwiGLU epilogue
    ("grouped_swiglu_input_grad_kernel", "grouped GEMM"),
    ("ce_backward_kernel", "cross-entropy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_3", "elementwise/norm"),
    ("Memcpy DtoH (Device -> Pinned)", "memcpy/memset"),
    ("some_unknown_kernel", "other"),
])
def test_profile_step_categories(name, category):
    from benchmarks import profile_step

    assert profile_step.categorize(name) == category


def test_profile_step_union():
    from benchmarks.profile_step import union_us

    assert union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert union_us([]) == 0


def test_profile_step_device_breakdown_skips_gpu_annotations():
    """A record_function range on the GPU timeline spans its kernels: counted, the optimizer's
    kernels would be counted twice (seen on an H100: 20 ms of 'optimizer' for 10 ms of kernels)."""
    from types import SimpleNamespace

    from benchmarks.profile_step import device_breakdown

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("Optimizer.step#AdamW.step", 100, 400, annotation=True),
              event("multi_tensor_apply_kernel", 100, 400),
              event("nvjet_sm90_gemm", 0, 80),
              event("aten::mm", 0, 80, device=cpu)]
    per_category, per_kernel = device_breakdown(SimpleNamespace(events=lambda: events), steps=2)
    assert per_category["optimizer"] == pytest.approx(0.15)  # 300 us over 2 steps, once
    assert per_category["dense GEMM"] == pytest.approx(0.04)
    assert per_category["idle/host"] == pytest.approx(0.01)  # the 20 us gap between them
    assert "Optimizer.step#AdamW.step" not in per_kernel


def test_profile_step_tiny(capsys):
    """Eager on CPU (a compiled tiny run takes ~30 s): one record per category for both models,
    the categories and the host remainder add up to the profiled wall time."""
    from benchmarks import profile_step

    records = profile_step.main(["--tiny", "--compile-mode", "eager", "--steps", "1", "--iters", "1"])
    assert _lines(capsys) == records
    by_category = {r["category"]: r for r in records}
    assert set(profile_step.ORDER) <= set(by_category)
    for model in ("moe", "dense"):
        parts = sum(by_category[c][f"{model}_ms"] for c in profile_step.ORDER)
        wall = by_category["step (profiled, wall)"][f"{model}_ms"]
        assert parts == pytest.approx(max(wall, by_category["kernels (sum)"][f"{model}_ms"]), rel=0.02, abs=0.02)
    assert by_category["grouped GEMM"]["dense_ms"] == 0  # the dense model has no experts
    assert by_category["routing/permute"]["moe_ms"] > by_category["routing/permute"]["dense_ms"]
    assert by_category["idle/host"]["gap_ms"] == pytest.approx(
        by_category["idle/host"]["moe_ms"] - by_category["idle/host"]["dense_ms"], abs=2e-3)


def test_summarize_groups_new_benchmarks_and_ratios():
    """One table per benchmark; vs_dense divides by the same run's dense row of the same shape
    (layer) or system (training step); the logging and profile tables show their key columns."""
    from benchmarks import summarize

    records = [
        {"bench": "moe_layer", "shape": "qwen3", "system": "dense_gemm", "status": "ok", "tflops": 600.0},
        {"bench": "moe_layer", "shape": "qwen3", "system": "moe_dist", "status": "ok", "tflops": 420.0},
        {"bench": "moe_layer", "shape": "mixtral", "system": "dense_gemm", "status": "ok", "tflops": 700.0},
        {"bench": "moe_layer", "shape": "mixtral", "system": "moe_dist", "status": "ok", "tflops": 630.0},
        {"bench": "moe_layer", "shape": "qwen3", "system": "deepspeed", "status": "unsupported: top_k"},
        {"bench": "train_step", "model": "moe", "system": "moe_dist_compiled", "status": "ok", "tokens_per_s": 180},
        {"bench": "train_step", "model": "dense", "system": "moe_dist_compiled", "status": "ok", "tokens_per_s": 200},
        {"bench": "train_step", "model": "moe", "system": "moe_dist", "status": "ok", "tokens_per_s": 100},
        {"bench": "train_step", "model": "moe", "system": "moe_dist_triton_fused_compiled", "status": "ok",
         "tokens_per_s": 170},
        {"bench": "logging_cost", "mode": "cost", "status": "ok", "relative_cost_pct": 0.42},
        {"bench": "profile_step", "category": "grouped GEMM", "moe_ms": 20.0, "dense_ms": 0.0, "gap_ms": 20.0},
    ]
    text = summarize.summarize(json.dumps(r) for r in records)
    blocks = text.split("\n\n")  # a heading, then its table
    tables = {heading: table.splitlines() for heading, table in zip(blocks[0::2], blocks[1::2])}
    assert set(tables) == {"### moe_layer", "### train_step", "### logging_cost", "### profile_step"}

    def column(bench: str, name: str) -> list[str]:
        header, _, *rows = tables[f"### {bench}"]
        at = [c.strip() for c in header.strip("|").split("|")].index(name)
        return [[c.strip() for c in row.strip("|").split("|")][at] for row in rows]

    assert column("moe_layer", "vs_dense") == ["1.0", "0.7", "1.0", "0.9", ""]
    # eager moe has no eager dense row; the triton_fused MoE compares with the plain dense row
    assert column("train_step", "vs_dense") == ["0.9", "", "", "0.85"]
    assert column("logging_cost", "relative_cost_pct") == ["0.42"]
    assert column("profile_step", "gap_ms") == ["20.0"]


def test_run_gpu_stages_match_docs():
    """The stages docs/performance.md names for issue 19 exist in run_gpu.sh, run what it says,
    and are in the default run; the layer stage's default shapes include the Qwen3-like one."""
    import re

    script = (REPO / "benchmarks" / "run_gpu.sh").read_text()
    cases = dict(re.findall(r"^\s{4}(\w+)\)(.*?);;", script, flags=re.M | re.S))
    assert "--compile-mode reduce-overhead" in cases["train_compile_graphs"]
    assert "max-autotune-no-cudagraphs" in cases["train_autotune"]
    assert "benchmarks.logging_cost" in cases["logging"]
    assert "benchmarks.profile_step" in cases["train_profile"]
    for stage in ("train_compile", "logging", "train_profile"):
        assert '--compile-mode "$COMPILE_MODE"' in cases[stage]
    default = re.search(r"^STAGES=\$\{\*:-(.*)\}$", script, flags=re.M).group(1).split()
    assert {"layer", "train_compile_graphs", "logging", "train_profile"} <= set(default)
    assert "qwen3" in moe_layer.SHAPES and "$LAYER_ARGS" in cases["layer"]  # --shapes defaults to all
    docs = (REPO / "docs" / "performance.md").read_text()
    how_to = docs[docs.index("## How to reproduce"):docs.index("## One MoE layer")]
    named = set(re.findall(r"`(\w+)`", how_to))
    assert {"train_compile_graphs", "train_autotune", "logging", "train_profile"} <= named
    for command in re.findall(r"run_gpu\.sh ([\w ]+)", how_to):
        assert set(command.split()) <= set(cases) | {"tests", "syncs"}, command


def test_largest_model_tiny(capsys):
    """The offloaded and on-device runs of benchmarks/largest_model.py train the same tiny model
    on CPU: their losses agree (fp32 there), and the reported rates follow from the step time."""
    from benchmarks import largest_model

    offloaded = largest_model.main(["--tiny", "--steps", "2", "--warmup", "1"])[0]
    on_device = largest_model.main(["--tiny", "--no-offload", "--steps", "2", "--warmup", "1"])[0]
    assert _lines(capsys) == [offloaded, on_device]
    for r in (offloaded, on_device):
        assert r["status"] == "ok" and r["steps_timed"] == 2
        assert r["tokens_per_step"] == r["micro_batch"] * r["accum"] * r["seq"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"], rel=1e-3)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 989e12, rel=1e-6)
        assert 0 < r["optimizer_s"] < r["step_s"] and r["active_params"] < r["total_params"]
    assert offloaded["offload"] and not on_device["offload"]
    assert offloaded["loss_last"] == pytest.approx(on_device["loss_last"], abs=1e-3)
    assert offloaded["loss_last"] < offloaded["loss_first"]
    assert offloaded["estimate_host_gib"] > 0 and on_device["estimate_host_gib"] == 0
