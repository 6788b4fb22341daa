"""SwiGLU (or ReLU) experts evaluated as one grouped GEMM over expert-sorted tokens.

Input rows arrive sorted by expert with ``tokens_per_expert`` rows each (trailing rows past
the sum are padding and come back as zeros). The fast path is ``torch._grouped_mm`` with
device-side offsets (no host sync); widths it cannot take (rows not 16-byte aligned, e.g.
SwitchHead's d_h=52) are zero-padded to the next aligned width, which costs a copy but no sync.
The exact fallback loops over experts. ``backend='triton_fused'`` runs SwiGLU experts through
:mod:`moe_dist.moe.kernels.grouped_swiglu` (the activation inside the GEMM epilogues) on CUDA
and behaves as 'auto' everywhere else.

Weights: ``w13[E, D, 2F]`` (gate and up projections fused) and ``w2[E, F, D]``. With
``activation='relu'`` (the sigma-MoE's two-layer experts, ``ReLU(x W1) W2``) ``w13`` holds only
the up projection, ``[E, D, F]``: :attr:`GroupedExperts.fused_parts` says how many parts it fuses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.moe.kernels import expert_ops, grouped_swiglu
from moe_dist.moe.kernels.permute import triton_available

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded (stride-0) gradients, such as the one
    ``out.sum().backward()`` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _ZeroTail(torch.autograd.Function):
    """Forward: zero (in place) the rows of a fresh grouped_mm output past the last offset.
    Backward: pass the gradient on, made contiguous (see :class:`_ContiguousGrad`)."""

    @staticmethod
    def forward(ctx, out, offsets):
        expert_ops.zero_rows_from_(out, offsets)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(), None


class _ZeroTailGrad(torch.autograd.Function):
    """Identity whose backward zeroes the rows of the gradient past the last offset (the input
    gradient of grouped_mm, a fresh buffer only this node reads, so it is zeroed in place)."""

    @staticmethod
    def forward(ctx, x, offsets):
        ctx.save_for_backward(offsets)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        return expert_ops.zero_rows_from_(grad.contiguous(), offsets), None


def _use_fast_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """On CUDA under autocast, the activation in the autocast dtype.

    ``torch._grouped_mm`` and the Triton kernels are not autocast ops: an fp32 residual stream
    would otherwise send fp32 rows to the experts (and fp32 takes the per-expert loop, with a
    host sync). CPU tensors are returned unchanged.
    """
    if x.is_cuda and x.is_floating_point() and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        if x.dtype != dtype:
            return x.to(dtype)
    return x


def grouped_mm_dtype_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes ``x``'s dtype on its device (any width, after padding)."""
    if not _HAS_GROUPED_MM or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda" and x.dtype == torch.float32:
        return False  # the CUDA kernel is bf16/fp16 only
    if x.dtype == torch.float32 and torch.compiler.is_compiling():
        return False  # its fake (meta) kernel accepts bf16 only, so fp32 cannot be traced
    return True


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch._grouped_mm accepts these operands as they are (16-byte aligned rows, float dtypes)."""
    if not grouped_mm_dtype_supported(x):
        return False
    align = 16 // x.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def _pad_to_alignment(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``x``'s and ``w``'s inner width and ``w``'s output width to 16-byte rows.

    Zero columns add nothing to the products, so the first ``F`` output columns are exact.
    """
    align = 16 // x_ND.element_size()
    pad_in, pad_out = -w_EDF.shape[-2] % align, -w_EDF.shape[-1] % align
    return F.pad(x_ND, (0, pad_in)), F.pad(w_EDF.to(x_ND.dtype), (0, pad_out, 0, pad_in))


def grouped_matmul(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for rows sorted by expert."""
    if backend in ("auto", "triton_fused"):  # triton_fused: only SwiGLU experts, see GroupedExperts
        if grouped_mm_supported(x_ND, w_EDF):
            backend = "grouped_mm"
        elif grouped_mm_dtype_supported(x_ND):
            out_features = w_EDF.shape[-1]
            x_padded, w_padded = _pad_to_alignment(x_ND, w_EDF)
            # contiguous: the fused SwiGLU kernel and the permutation kernels read dense rows
            return grouped_matmul(x_padded, w_padded, tokens_per_expert, "grouped_mm")[:, :out_features].contiguous()
    if backend == "grouped_mm":
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        if not len(offsets):
            return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDF.to(x_ND.dtype), offs=offsets))
        # Rows past the last offset are padding; grouped_mm leaves them undefined in the output
        # and in the input gradient, so both are masked (the input gradient via the where).
        if _use_fast_kernels(x_ND):
            # Same masking, touching only the padding rows (none when dropless).
            x_in = _ZeroTailGrad.apply(x_ND, offsets)
            return _ZeroTail.apply(torch._grouped_mm(x_in, w_EDF.to(x_ND.dtype), offs=offsets), offsets)
        row = torch.arange(x_ND.shape[0], device=x_ND.device)
        real = (row < offsets[-1]).unsqueeze(-1)
        x_ND = torch.where(real, x_ND, 0.0)
        out = _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDF.to(x_ND.dtype), offs=offsets))
        return torch.where(real, out, 0.0)
    return _loop_matmul(x_ND, w_EDF, tokens_per_expert)


def _loop_matmul(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    # NOTE: device-to-host sync on the counts; this is the reference path, not the fast one.
    counts = tokens_per_expert.tolist()
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        pieces.append(x_ND[start:start + count] @ w_EDF[expert].to(x_ND.dtype))
        start += count
    padding = x_ND.shape[0] - start
    if padding:
        pieces.append(x_ND.new_zeros(padding, w_EDF.shape[-1]))
    return torch.cat(pieces, dim=0) if pieces else x_ND.new_zeros(0, w_EDF.shape[-1])


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU (default) or ReLU experts; under EP this module holds only the
    local ones.

    ``expert_offset`` is the global id of local expert 0 (set by expert parallelism).
    """

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, backend: str = "auto",
                 activation: str = "swiglu") -> None:
        super().__init__()
        if activation not in ("swiglu", "relu"):
            raise ValueError(f"expert activation {activation!r} is not 'swiglu' or 'relu'")
        self.num_experts = num_experts
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.backend = backend
        self.activation = activation
        self.fused_parts = 2 if activation == "swiglu" else 1
        """Projections fused along ``w13``'s last dim (gate and up for SwiGLU, up for ReLU)."""
        self.expert_offset = 0
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, self.fused_parts * ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std if out_std is not None else std)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        x_ND = to_autocast_dtype(x_ND)
        if self.backend == "triton_fused" and self._fused_swiglu_applies(x_ND):
            offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
            return grouped_swiglu.fused_swiglu_experts(x_ND, self.w13.to(x_ND.dtype), self.w2.to(x_ND.dtype), offsets)
        h = grouped_matmul(x_ND, self.w13, tokens_per_expert, self.backend)
        if self.activation == "relu":
            act = F.relu(h)
        elif _use_fast_kernels(h):
            act = expert_ops.swiglu(h)  # one fused pass forward and backward
        else:
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return grouped_matmul(act, self.w2, tokens_per_expert, self.backend)

    def _fused_swiglu_applies(self, x_ND: torch.Tensor) -> bool:
        # The fused kernels cover SwiGLU with the Triton path up; the other GEMMs of its
        # backward are grouped_mm's, hence its dtype and alignment rules.
        return (self.activation == "swiglu" and self.num_experts > 0 and _use_fast_kernels(x_ND)
                and grouped_mm_supported(x_ND, self.w13, self.w2))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, "
                f"offset={self.expert_offset}, backend={self.backend}, activation={self.activation}")


def init_std_for_output(std: float, n_layers: int) -> float:
    """Output projections are scaled down with depth (GPT-2 / Megatron)."""
    return std / math.sqrt(2 * n_layers)
