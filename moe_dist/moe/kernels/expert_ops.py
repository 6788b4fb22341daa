"""Expert-side kernels (Triton) beside their torch references.

* ``swiglu``: ``silu(h[:, :F]) * h[:, F:]`` on the fused gate/up GEMM output ``h [N, 2F]``,
  with a backward that writes ``dh`` in one pass (the eager version materialises
  ``silu(gate)``, and the backward of ``chunk`` concatenates two gradient halves).
* ``zero_rows_from_``: zero, in place, the rows ``[offsets[-1], N)`` of a buffer, reading the
  end from the device (no host sync) and touching only those rows. ``torch._grouped_mm``
  leaves the rows past its last offset undefined, in its output and in its input gradient.

Both are ``torch.library.triton_op`` custom ops (``moe_dist::*``; SwiGLU with registered
autograd), so ``torch.compile`` traces them without a graph break.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.library import triton_op

from moe_dist.moe.kernels.launch import launcher


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_fwd_kernel(h_ptr, out_ptr, ffn, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < ffn
        gate = tl.load(h_ptr + row * 2 * ffn + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * ffn + ffn + cols, mask=ok, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * ffn + cols, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def swiglu_bwd_kernel(h_ptr, g_ptr, dh_ptr, ffn, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < ffn
        gate = tl.load(h_ptr + row * 2 * ffn + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * ffn + ffn + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * ffn + cols, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dh_ptr + row * 2 * ffn + cols, d_gate.to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptr + row * 2 * ffn + ffn + cols, (g * silu).to(dh_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def zero_rows_kernel(x_ptr, offsets_ptr, num_groups, num_rows, dim,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        end = tl.load(offsets_ptr + num_groups - 1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = (rows >= end) & (rows < num_rows)
        zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=x_ptr.dtype.element_ty)
        # Blocks wholly inside the real rows skip the column loop.
        stop = tl.where(tl.sum(row_mask.to(tl.int32), 0) > 0, dim, 0)
        for start in range(0, stop, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < dim)[None, :]
            tl.store(x_ptr + rows[:, None] * dim + cols[None, :], zeros, mask=mask)

    return swiglu_fwd_kernel, swiglu_bwd_kernel, zero_rows_kernel


def _block(n: int, cap: int = 1024) -> int:
    return min(max(16, 1 << (n - 1).bit_length()), cap)


# ---------------------------------------------------------------------------------------------
# SwiGLU on the fused gate/up projection


def swiglu_ref(h_N2F: torch.Tensor) -> torch.Tensor:
    gate, up = h_N2F.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton_op("moe_dist::swiglu_forward", mutates_args=())
def _swiglu_forward_op(h_N2F: torch.Tensor) -> torch.Tensor:
    rows, ffn = h_N2F.shape[0], h_N2F.shape[1] // 2
    out = torch.empty(rows, ffn, dtype=h_N2F.dtype, device=h_N2F.device)
    launch = launcher(_kernels()[0], h_N2F)
    if launch is not None and rows and ffn:
        block = _block(ffn)
        launch[(rows, -(-ffn // block))](h_N2F, out, ffn, BLOCK=block)
    return out


@triton_op("moe_dist::swiglu_backward", mutates_args=())
def _swiglu_backward_op(h_N2F: torch.Tensor, grad_NF: torch.Tensor) -> torch.Tensor:
    rows, ffn = grad_NF.shape
    dh = torch.empty_like(h_N2F)
    launch = launcher(_kernels()[1], h_N2F)
    if launch is not None and rows and ffn:
        block = _block(ffn)
        launch[(rows, -(-ffn // block))](h_N2F, grad_NF, dh, ffn, BLOCK=block)
    return dh


def swiglu_forward(h_N2F: torch.Tensor) -> torch.Tensor:
    return _swiglu_forward_op(h_N2F.contiguous())


def swiglu_backward(h_N2F: torch.Tensor, grad_NF: torch.Tensor) -> torch.Tensor:
    return _swiglu_backward_op(h_N2F.contiguous(), grad_NF.contiguous())


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, grad_NF):
    (h,) = ctx.saved_tensors
    return swiglu_backward(h, grad_NF)


_swiglu_forward_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def swiglu(h_N2F: torch.Tensor) -> torch.Tensor:
    """Differentiable fused SwiGLU (custom op ``moe_dist::swiglu_forward`` with autograd)."""
    if h_N2F.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension (gate|up), got {h_N2F.shape[-1]}")
    return swiglu_forward(h_N2F)


# ---------------------------------------------------------------------------------------------
# Zeroing the rows past the last group offset


def zero_rows_from_ref(x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    if offsets_E.numel() == 0:
        return x_ND.zero_()
    row = torch.arange(x_ND.shape[0], device=x_ND.device)
    return x_ND.masked_fill_((row >= offsets_E[-1]).unsqueeze(-1), 0)


@triton_op("moe_dist::zero_rows_from_", mutates_args={"x_ND"})
def _zero_rows_from_op(x_ND: torch.Tensor, offsets_E: torch.Tensor) -> None:
    rows, dim = x_ND.shape
    launch = launcher(_kernels()[2], x_ND)
    if launch is not None and rows and dim:
        block_r, block_d = 16, _block(dim, 256)
        launch[(-(-rows // block_r),)](x_ND, offsets_E, offsets_E.numel(), rows, dim,
                                       BLOCK_R=block_r, BLOCK_D=block_d)


def zero_rows_from_(x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """In place: rows at or past ``offsets_E[-1]`` become 0. ``x_ND`` must be contiguous.
    The kernel is the custom op ``moe_dist::zero_rows_from_`` (declared as mutating ``x_ND``)."""
    if not x_ND.is_contiguous():
        raise ValueError("zero_rows_from_ needs a contiguous buffer")
    if offsets_E.numel() == 0:
        return x_ND.zero_()
    _zero_rows_from_op(x_ND, offsets_E.contiguous())
    return x_ND
