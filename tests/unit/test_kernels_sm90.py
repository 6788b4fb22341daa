"""The grouped SwiGLU GEMM kernels (and the bf16-moment AdamW's) compile for an H100 (sm_90)
on this CPU machine.

The interpreter (test_kernels.py) checks their numerics but not that Triton can lower them.
Here every autotuning configuration is compiled ahead of time, without a GPU, with what Triton's
JIT specialises at a real launch (16-byte aligned pointers and strides, a unit stride as the
constant 1), for the shapes of the benchmark. The PTX must use Hopper's warpgroup MMA (wgmma)
fed by asynchronous copies, with both operands multi-buffered in shared memory: the main loop
is tensor-core and software-pipelined. It runs in a subprocess: the suite sets TRITON_INTERPRET=1,
under which ``@triton.jit`` builds interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from tests.smoke.conftest import REPO  # noqa: E402

_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_dist.moe.kernels import grouped_swiglu as host
from moe_dist.moe.kernels import grouped_swiglu_triton as source

SIGNATURE = {"a_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "out_ptr": "*bf16", "offsets_ptr": "*i32",
             "num_groups": "i32", "num_rows": "i32", "dim": "constexpr", "ffn": "constexpr",
             "stride_we": "i32", "stride_w1": "i32", "stride_w2": "constexpr", "BLOCK_M": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr", "GROUPS_P2": "constexpr"}
names = list(SIGNATURE)
aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
           if SIGNATURE[name].startswith("*") or SIGNATURE[name] == "i32" and name.startswith("stride")}
results = []
for kernel, configs in ((source.grouped_gate_up_swiglu_kernel, host._GATE_UP_CONFIGS),
                        (source.grouped_swiglu_input_grad_kernel, host._INPUT_GRAD_CONFIGS)):
    # positional names differ per kernel; the types and order are the same
    signature = dict(zip(kernel.arg_names, SIGNATURE.values()))
    for dim, ffn, groups in ((4096, 14336, 8), (2048, 768, 128)):
        for m, n, k, g, warps, stages in configs:
            values = dict(dim=dim, ffn=ffn, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g,
                          GROUPS_P2=max(16, groups))
            constexprs = {(kernel.arg_names.index(name),): value for name, value in values.items()}
            constexprs[(names.index("stride_w2"),)] = 1  # contiguous weights: the JIT specialises a 1
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
            ptx = compiled.asm["ptx"]
            buffers = (m * k + (2 if "gate_up" in kernel.__name__ else 1) * k * n) * 2  # bf16 A and B tiles
            results.append(dict(kernel=kernel.__name__, config=[m, n, k, g, warps, stages], dim=dim,
                                wgmma="wgmma.mma_async" in ptx, async_copy="cp.async" in ptx,
                                shared=compiled.metadata.shared, stage_bytes=buffers))

from moe_dist.train import adamw_bf16_moments
adamw = adamw_bf16_moments._kernel()
types = {"param_ptr": "*fp32", "grad_ptr": "*fp32", "exp_avg_ptr": "*bf16", "exp_avg_sq_ptr": "*bf16",
         "grad_scale_ptr": "*fp32", "numel": "i32", "HAS_GRAD_SCALE": "constexpr", "BLOCK": "constexpr"}
signature = {name: types.get(name, "fp32") for name in adamw.arg_names}
constants = {(adamw.arg_names.index("BLOCK"),): 2048, (adamw.arg_names.index("HAS_GRAD_SCALE"),): True}
aligned = {(adamw.arg_names.index(name),): [["tt.divisibility", 16]]
           for name in ("param_ptr", "grad_ptr", "exp_avg_ptr", "exp_avg_sq_ptr", "numel")}
compiled = triton.compile(ASTSource(fn=adamw, signature=signature, constexprs=constants, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
ptx = compiled.asm["ptx"]
results.append(dict(kernel="adamw_bf16_moments_kernel", vector_loads="ld.global.v4" in ptx,
                    rounds_to_nearest="cvt.rn.bf16" in ptx))
print(json.dumps(results))
"""


def test_grouped_swiglu_kernels_compile_for_sm90_with_wgmma_and_pipelined_loads():
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 3):
        pytest.skip(f"triton {triton.__version__}: ASTSource attrs as a dict came in 3.3")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    adamw = results.pop()
    # the bf16-moment AdamW (numel a multiple of 16, as the JIT specialises it for weight tensors):
    # 16-byte loads, and fp32 -> bf16 rounded to nearest (as torch rounds)
    assert adamw["vector_loads"] and adamw["rounds_to_nearest"], adamw
    assert len(results) == 2 * 2 * 5
    for result in results:
        assert result["wgmma"] and result["async_copy"], result
        assert 0 < result["shared"] <= 227 * 1024, result  # fits an H100 SM's shared memory
        # Both operands multi-buffered: at least two stages of A and B tiles in shared memory
        # (a weight tile loaded through registers instead would leave room for one B tile only).
        assert result["shared"] >= 2 * result["stage_bytes"], result
