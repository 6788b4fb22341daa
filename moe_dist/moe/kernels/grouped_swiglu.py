"""SwiGLU experts whose activation lives in the epilogues of Triton grouped GEMMs.

The routed experts compute ``out = swiglu(x @ w13[e]) @ w2[e]`` over rows sorted by expert.
With ``torch._grouped_mm`` the SwiGLU is a memory pass of its own each way: forward it reads
``h [N, 2F]`` and writes ``act [N, F]``; backward, the input-gradient GEMM of ``w2`` writes
``d_act [N, F]`` and the SwiGLU backward reads it back beside ``h``. Two kernels remove those
passes:

* ``gate_up_swiglu``: ``h = x @ w13[e]`` on each expert's rows. One program computes a gate
  tile and the matching up tile from the same ``x`` tile, then writes ``h`` (kept for the
  backward) and ``act = silu(gate) * up``, computed from the fp32 accumulators.
* ``swiglu_input_grad``: ``d_act = d_out @ w2[e]^T`` with the SwiGLU backward in the epilogue:
  it reads the ``h`` tiles and writes ``dh [N, 2F]``; ``d_act`` never reaches memory.

The second expert GEMM, the weight gradients and the input gradient of ``w13`` stay on
``torch._grouped_mm``: nothing is fused there.

Scheduling without a host sync: every program along M derives its (expert, row block) from
the group offsets on the device. The grid is sized for the worst case, ``ceil(N / BLOCK_M) + E``
row blocks, and the programs past the last real block return at once. Blocks never straddle
two experts. Programs are ordered in bands of ``GROUP_M`` row blocks, so that a band's rows
stay in L2 while the band sweeps the weight columns.

Rows past the last offset (padding) are neither read nor written by the kernels; the
autograd function zeroes them in ``out`` and in the input gradient, as the grouped_mm path does.
"""

from __future__ import annotations

import functools

import torch
from torch.library import triton_op

from moe_dist.moe.kernels import expert_ops
from moe_dist.moe.kernels.launch import is_interpreted, launcher

# Tried by the autotuner on CUDA, per (dim, ffn): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages).
# BLOCK_N counts the columns of one half (gate or up), so the gate/up kernel holds two
# BLOCK_M x BLOCK_N accumulators. Register use compiled for sm_90 (ptxas, Triton 3.9): the
# gate/up kernel spills 8 bytes at 128 x 128 (two 128 x 128 accumulators), none at the others;
# the input-gradient kernel 28-32 bytes at 128 x 128 and 64 x 256 (its epilogue holds two h tiles
# beside the accumulator), none at 128 x 64 or 64 x 128.
_GATE_UP_CONFIGS = [
    (128, 64, 64, 8, 8, 4),
    (128, 64, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 8, 4),
    (128, 64, 32, 8, 8, 5),
]
_INPUT_GRAD_CONFIGS = [
    (128, 128, 64, 8, 8, 4),
    (128, 64, 64, 8, 8, 4),
    (64, 128, 64, 8, 8, 4),
    (128, 128, 32, 8, 8, 4),
    (64, 256, 64, 8, 8, 3),
]
# Under TRITON_INTERPRET (CPU tests) one small configuration, no autotuning.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)


@functools.cache
def _kernels():
    from moe_dist.moe.kernels import grouped_swiglu_triton as source

    if is_interpreted(source.grouped_gate_up_swiglu_kernel):
        return source.grouped_gate_up_swiglu_kernel, source.grouped_swiglu_input_grad_kernel
    import triton

    def autotuned(kernel, configs):
        return triton.autotune(
            [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g), num_warps=w, num_stages=s)
             for m, n, k, g, w, s in configs],
            key=["dim", "ffn"])(kernel)

    return (autotuned(source.grouped_gate_up_swiglu_kernel, _GATE_UP_CONFIGS),
            autotuned(source.grouped_swiglu_input_grad_kernel, _INPUT_GRAD_CONFIGS))


def tuned_configs() -> dict[str, str]:
    """The configuration the autotuner chose last, per kernel (empty before the first CUDA launch)."""
    if not _kernels.cache_info().currsize or _interpreted():
        return {}
    return {kernel.fn.__name__: str(kernel.best_config) for kernel in _kernels()
            if getattr(kernel, "best_config", None) is not None}


def _grid(num_rows: int, num_groups: int, ffn: int):
    def grid(meta):
        blocks_m = -(-num_rows // meta["BLOCK_M"]) + num_groups
        return (blocks_m * -(-ffn // meta["BLOCK_N"]),)
    return grid


def _interpreted() -> bool:
    return is_interpreted(_kernels()[0])


def _launch_options(num_groups: int) -> dict:
    options = dict(GROUPS_P2=max(16, 1 << (num_groups - 1).bit_length()))
    if _interpreted():
        options.update(_INTERPRETER_CONFIG)
    return options


@triton_op("moe_dist::grouped_gate_up_swiglu", mutates_args=())
def _gate_up_swiglu_op(x_ND: torch.Tensor, w13_ED2F: torch.Tensor,
                       offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, dim = x_ND.shape
    num_groups, ffn = w13_ED2F.shape[0], w13_ED2F.shape[2] // 2
    h = torch.empty(rows, 2 * ffn, dtype=x_ND.dtype, device=x_ND.device)
    act = torch.empty(rows, ffn, dtype=x_ND.dtype, device=x_ND.device)
    launch = launcher(_kernels()[0], x_ND)
    if launch is not None and rows and ffn and num_groups:
        launch[_grid(rows, num_groups, ffn)](
            x_ND, w13_ED2F, h, act, offsets_E, num_groups, rows, dim, ffn,
            w13_ED2F.stride(0), w13_ED2F.stride(1), w13_ED2F.stride(2), **_launch_options(num_groups))
    return h, act


@triton_op("moe_dist::grouped_swiglu_input_grad", mutates_args=())
def _swiglu_input_grad_op(grad_ND: torch.Tensor, w2_EFD: torch.Tensor, h_N2F: torch.Tensor,
                          offsets_E: torch.Tensor) -> torch.Tensor:
    rows, dim = grad_ND.shape
    num_groups, ffn = w2_EFD.shape[0], w2_EFD.shape[1]
    dh = torch.empty_like(h_N2F)
    launch = launcher(_kernels()[1], grad_ND)
    if launch is not None and rows and ffn and num_groups:
        launch[_grid(rows, num_groups, ffn)](
            grad_ND, w2_EFD, h_N2F, dh, offsets_E, num_groups, rows, dim, ffn,
            w2_EFD.stride(0), w2_EFD.stride(1), w2_EFD.stride(2), **_launch_options(num_groups))
    return dh


def gate_up_swiglu(x_ND: torch.Tensor, w13_ED2F: torch.Tensor,
                   offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, swiglu(h))`` with ``h = x @ w13[e]`` on each expert's rows; padding rows undefined."""
    return _gate_up_swiglu_op(x_ND.contiguous(), w13_ED2F, offsets_E.contiguous())


def swiglu_input_grad(grad_ND: torch.Tensor, w2_EFD: torch.Tensor, h_N2F: torch.Tensor,
                      offsets_E: torch.Tensor) -> torch.Tensor:
    """``dh`` of ``act = swiglu(h)`` given ``d_out`` of ``out = act @ w2[e]``; padding rows undefined."""
    return _swiglu_input_grad_op(grad_ND.contiguous(), w2_EFD, h_N2F.contiguous(), offsets_E.contiguous())


class FusedSwiGLUExperts(torch.autograd.Function):
    """``swiglu(x @ w13[e]) @ w2[e]`` per expert's rows, padding rows zero (forward and dx).

    ``w13`` and ``w2`` come in the activation dtype (the caller casts, so that autograd casts
    the weight gradients back to the parameters' dtype). Saved for the backward: ``x``, ``h``,
    ``act`` and the weights, as the unfused path saves them.
    """

    @staticmethod
    def forward(ctx, x_ND, w13_ED2F, w2_EFD, offsets_E):
        h, act = gate_up_swiglu(x_ND, w13_ED2F, offsets_E)
        out = torch._grouped_mm(act, w2_EFD, offs=offsets_E)
        expert_ops.zero_rows_from_(out, offsets_E)
        ctx.save_for_backward(x_ND, h, act, w13_ED2F, w2_EFD, offsets_E)
        return out

    @staticmethod
    def backward(ctx, grad_ND):
        x, h, act, w13, w2, offsets = ctx.saved_tensors
        needs_x, needs_w13, needs_w2, _ = ctx.needs_input_grad
        grad_ND = grad_ND.contiguous()
        grad_x = grad_w13 = grad_w2 = None
        # Weight gradients group the contraction over each expert's rows: padding rows are not read.
        if needs_w2:
            grad_w2 = torch._grouped_mm(act.t(), grad_ND, offs=offsets)
        if needs_x or needs_w13:
            dh = swiglu_input_grad(grad_ND, w2, h, offsets)
            if needs_w13:
                grad_w13 = torch._grouped_mm(x.t(), dh, offs=offsets)
            if needs_x:
                grad_x = torch._grouped_mm(dh, w13.transpose(-2, -1), offs=offsets)
                expert_ops.zero_rows_from_(grad_x, offsets)
        return grad_x, grad_w13, grad_w2, None


def fused_swiglu_experts(x_ND: torch.Tensor, w13_ED2F: torch.Tensor, w2_EFD: torch.Tensor,
                         offsets_E: torch.Tensor) -> torch.Tensor:
    """Differentiable SwiGLU experts with the activation fused into the GEMM epilogues."""
    if w13_ED2F.shape[-1] != 2 * w2_EFD.shape[-2]:
        raise ValueError(f"w13's last dim ({w13_ED2F.shape[-1]}) must be twice w2's ffn dim ({w2_EFD.shape[-2]})")
    return FusedSwiGLUExperts.apply(x_ND.contiguous(), w13_ED2F, w2_EFD, offsets_E)
