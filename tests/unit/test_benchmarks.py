"""Each benchmark runs at --tiny size on CPU and prints well-formed JSON lines with numbers
that are consistent with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    results = moe_layer.main(["--tiny", "--systems", "dense_gemm", "moe_dist", "moe_dist_torch", "deepspeed",
                              "--iters", "1", "--warmup", "1"])
    assert _lines(capsys) == results
    ok = [r for r in results if r["status"] == "ok"]
    assert {(r["shape"], r["system"]) for r in ok} >= {
        ("mixtral_tiny", "moe_dist"), ("fine_grained_tiny", "moe_dist"), ("fine_grained_tiny", "dense_gemm"),
        ("qwen3_tiny", "moe_dist"), ("qwen3_tiny", "moe_dist_torch"), ("qwen3_tiny", "dense_gemm")}
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


def test_train_step_tiny(capsys):
    results = train_step.main(["--tiny", "--iters", "1", "--warmup", "1"])
    assert _lines(capsys) == results
    moe, dense = results
    assert moe["status"] == dense["status"] == "ok"
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
    assert records[0]["fraction_of_bare"] == pytest.approx(records[1]["ms"] / records[0]["ms"], rel=0.01)


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
