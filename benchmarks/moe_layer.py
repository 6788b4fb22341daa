"""One MoE layer, forward + backward, bf16: moe_dist against megatron-core and DeepSpeed.

Same inputs, same process, after warm-up. Systems:

* ``moe_dist``: MoELayer with its CUDA fast paths (Triton router/permute/unpermute/SwiGLU,
  torch._grouped_mm experts), dropless.
* ``moe_dist_triton_fused``: the same layer with ``moe.grouped_gemm=triton_fused``: Triton
  grouped GEMMs with the SwiGLU in their epilogues instead of grouped_mm + the SwiGLU kernel
  (autotuned on the first call, which the warm-up absorbs).
* ``moe_dist_torch``: the same layer on its plain torch path (the reference).
* ``moe_dist_compiled``: the torch path under ``torch.compile`` (``--compile``).
* ``megatron_core``: megatron-core's MoELayer with the local spec (SequentialMLP: one GEMM per
  expert; Transformer Engine and the grouped_gemm package are not installable on the
  machine), alltoall dispatcher, dropless.
* ``deepspeed`` / ``deepspeed_dropless``: DeepSpeed's MoE (capacity factor 1.0 / no drops);
  top-k <= 2 only, reported as unsupported otherwise (the fine-grained and Qwen3-like shapes).
* ``dense_gemm``: the same expert FLOPs as one dense SwiGLU MLP over T*K rows (the practical
  peak for these GEMM shapes): the input rows require a gradient like the MoE layer's input
  (so its backward runs both GEMMs' input gradients, the FLOPs counted below), and on CUDA the
  activation is the same fused SwiGLU kernel the moe_dist layer uses.
* ``dense_gemm_no_dx``: the baseline of the first GPU runs, kept for comparison: eager SwiGLU
  and input rows without a gradient, so its backward skips the first GEMM's input gradient
  (2/9 of the counted FLOPs) and its TFLOP/s overstates the dense rate.

Shapes (``--shapes``): ``mixtral`` (h4096 f14336 E8 top-2), ``fine_grained`` (h2048 f1408 E64
top-8 + 2 shared experts) and ``qwen3`` (Qwen3-MoE-like: h2048 f768 E128 top-8, no shared
expert), each over 8192 tokens; ``--tiny`` has a CPU-sized counterpart of each.

TFLOP/s counts the expert and shared-expert GEMMs: ``6 * T * (K*3*h*f + 3*h*f_shared)``
(forward 2x, backward 4x), not the router. Run ``python -m benchmarks.moe_layer --help``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (emit, error_record, gpu_name, init_single_process_group, log, pick_device,
                               reference_kernels_only, resolve_repeats, time_fwd_bwd)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    num_shared: int
    tokens: int

    def flops(self) -> float:
        per_token = self.top_k * 3 * self.hidden * self.ffn + 3 * self.hidden * self.ffn * self.num_shared
        return 6.0 * self.tokens * per_token  # forward (2) + backward (4)


SHAPES = {
    "mixtral": Shape("mixtral", 4096, 14336, 8, 2, 0, 8192),
    "fine_grained": Shape("fine_grained", 2048, 1408, 64, 8, 2, 8192),
    # Qwen3-MoE-like (Qwen3-30B-A3B's expert shape): many narrow experts, top-8, no shared expert.
    "qwen3": Shape("qwen3", 2048, 768, 128, 8, 0, 8192),
}
TINY = {
    "mixtral": Shape("mixtral_tiny", 64, 96, 4, 2, 0, 64),
    "fine_grained": Shape("fine_grained_tiny", 64, 32, 8, 4, 2, 64),
    "qwen3": Shape("qwen3_tiny", 64, 16, 16, 8, 0, 64),
}


# ---------------------------------------------------------------------------------------------
# Systems: each builder returns forward() -> output tensor [T, h] (or [S, B, h]).


def build_moe_dist(shape: Shape, x: torch.Tensor, device, dtype, grouped_gemm: str = "auto"):
    from moe_dist.config import MoEConfig, RouterConfig
    from moe_dist.moe.layer import MoELayer

    cfg = MoEConfig(num_experts=shape.num_experts, expert_ffn_dim=shape.ffn, num_shared_experts=shape.num_shared,
                    grouped_gemm=grouped_gemm, router=RouterConfig(top_k=shape.top_k, aux_loss_coef=0.0, z_loss_coef=0.0))
    layer = MoELayer(shape.hidden, shape.ffn, cfg).to(device=device, dtype=dtype)
    x_b = x.view(1, shape.tokens, shape.hidden)
    return layer, lambda: layer(x_b)[0]


def build_megatron(shape: Shape, x: torch.Tensor, device, dtype):
    init_single_process_group(device)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=max(1, shape.hidden // 128),
        ffn_hidden_size=shape.ffn, moe_ffn_hidden_size=shape.ffn, num_moe_experts=shape.num_experts,
        moe_router_topk=shape.top_k, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_shared_expert_intermediate_size=shape.ffn * shape.num_shared if shape.num_shared else None,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False, add_bias_linear=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=device.type != "cuda",
        moe_grouped_gemm=False)
    spec = get_moe_module_spec(use_te=False, num_experts=shape.num_experts, moe_grouped_gemm=False)
    layer = spec(config=config).to(device=device, dtype=dtype)
    x_sbh = x.view(shape.tokens, 1, shape.hidden)
    return layer, lambda: layer(x_sbh)[0]


class _SwiGLUExpert(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def build_deepspeed(shape: Shape, x: torch.Tensor, device, dtype, drop_tokens: bool):
    if shape.top_k > 2 or shape.num_shared:
        raise NotImplementedError("unsupported: DeepSpeed MoE supports top_k <= 2 and no shared experts")
    init_single_process_group(device)
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    layer = MoE(hidden_size=shape.hidden, expert=_SwiGLUExpert(shape.hidden, shape.ffn),
                num_experts=shape.num_experts, ep_size=1, k=shape.top_k, capacity_factor=1.0,
                eval_capacity_factor=1.0, min_capacity=4, drop_tokens=drop_tokens,
                top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    layer = layer.to(device=device, dtype=dtype)
    x_b = x.view(1, shape.tokens, shape.hidden)
    return layer, lambda: layer(x_b)[0]


class _DenseBaseline(nn.Module):
    """One SwiGLU MLP over its own input rows (a parameter, so ``zero_grad`` clears their grad)."""

    def __init__(self, rows: int, hidden: int, ffn: int, input_grad: bool, fused_act: bool) -> None:
        super().__init__()
        self.mlp = _SwiGLUExpert(hidden, ffn)
        self.rows = nn.Parameter(torch.randn(rows, hidden), requires_grad=input_grad)
        self.fused_act = fused_act

    def forward(self) -> torch.Tensor:
        if not self.fused_act:
            return self.mlp(self.rows)
        from moe_dist.moe.kernels import expert_ops

        return self.mlp.w2(expert_ops.swiglu(self.mlp.w13(self.rows)))


def build_dense(shape: Shape, x: torch.Tensor, device, dtype, same_work: bool = True):
    from moe_dist.moe.kernels.permute import triton_available

    rows = shape.tokens * shape.top_k + shape.tokens * shape.num_shared
    fused_act = same_work and device.type == "cuda" and triton_available()
    layer = _DenseBaseline(rows, shape.hidden, shape.ffn, input_grad=same_work, fused_act=fused_act)
    layer = layer.to(device=device, dtype=dtype)
    return layer, layer


# ---------------------------------------------------------------------------------------------


def run_system(system: str, shape: Shape, args, device, dtype) -> dict:
    base = {"bench": "moe_layer", "shape": shape.name, "system": system, "tokens": shape.tokens,
            "hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.num_experts, "top_k": shape.top_k,
            "shared": shape.num_shared, "dtype": str(dtype).removeprefix("torch."), "device": gpu_name(device)}
    torch.manual_seed(0)
    x = (torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype) * 0.5).requires_grad_(True)
    try:
        import contextlib

        ctx = reference_kernels_only() if system in ("moe_dist_torch", "moe_dist_compiled") else contextlib.nullcontext()
        with ctx:
            if system.startswith("moe_dist"):
                grouped_gemm = "triton_fused" if system == "moe_dist_triton_fused" else "auto"
                layer, forward = build_moe_dist(shape, x, device, dtype, grouped_gemm)
            elif system == "megatron_core":
                layer, forward = build_megatron(shape, x, device, dtype)
            elif system.startswith("deepspeed"):
                layer, forward = build_deepspeed(shape, x, device, dtype, drop_tokens=system == "deepspeed")
            elif system in ("dense_gemm", "dense_gemm_no_dx"):
                layer, forward = build_dense(shape, x, device, dtype, same_work=system == "dense_gemm")
            else:
                raise ValueError(f"unknown system {system!r}")
            if system == "moe_dist_compiled":
                compiled = torch.compile(layer)
                x_b = x.view(1, shape.tokens, shape.hidden)
                forward = lambda: compiled(x_b)[0]  # noqa: E731

            def zero_grad():
                layer.zero_grad(set_to_none=True)
                x.grad = None

            timing = time_fwd_bwd(forward, device, args.warmup, args.iters, zero_grad)
    except NotImplementedError as exc:
        return {**base, "status": str(exc)}
    except Exception as exc:  # one system failing must not hide the others
        log(f"[moe_layer] {system} on {shape.name} failed: {exc!r}")
        return error_record(base, exc)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tflops = shape.flops() / (timing.total_ms * 1e-3) / 1e12
    if system == "moe_dist_triton_fused":
        from moe_dist.moe.kernels import grouped_swiglu

        base["kernel_configs"] = grouped_swiglu.tuned_configs()
    return {**base, "status": "ok", "fwd_ms": round(timing.fwd_ms, 3), "bwd_ms": round(timing.bwd_ms, 3),
            "total_ms": round(timing.total_ms, 3), "tflops": round(tflops, 1),
            "peak_mem_gib": round(timing.peak_mem_gib, 2)}


SYSTEMS = ["dense_gemm", "dense_gemm_no_dx", "moe_dist", "moe_dist_triton_fused", "moe_dist_torch", "megatron_core", "deepspeed", "deepspeed_dropless"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes (tests)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--systems", nargs="+", default=SYSTEMS,
                        choices=SYSTEMS + ["moe_dist_compiled"])
    parser.add_argument("--compile", action="store_true", help="also time moe_dist_compiled")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    device = pick_device()
    resolve_repeats(args, warmup=5, iters=20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    systems = list(args.systems) + (["moe_dist_compiled"] if args.compile else [])
    results = []
    for name in args.shapes:
        shape = TINY[name] if args.tiny else SHAPES[name]
        for system in systems:
            record = run_system(system, shape, args, device, dtype)
            emit(record)
            results.append(record)
    return results


if __name__ == "__main__":
    main()
