"""Token permutation kernels (Triton) beside their torch references.

Three memory-bound primitives make up the single-device dispatch and combine:

* ``gather_rows``: ``out[n] = x[src[n]]`` (0 where the row is not valid) -- the permute, and
  the backward of the un-permute's gather.
* ``weighted_gather_sum``: ``out[t] = sum_k w[t, k] * y[inv[t, k]]`` over the valid slots,
  accumulated in fp32 -- the un-permute with the gating weights fused in, and (with w = 1)
  the backward of the permute.
* ``scatter_grad``: the backward of the un-permute in one pass: for sorted row n holding
  assignment a = t*K + k, ``grad_y[n] = w[a] * g[t]`` and ``grad_w[a] = <y[n], g[t]>``.

Each Triton entry point has a ``*_ref`` twin with the same signature written in plain torch.
The Triton paths are ``torch.library.triton_op`` custom ops (``moe_dist::*``), the permute and
the un-permute with registered autograd, so ``torch.compile`` traces them without a graph
break; their fake implementations are the op bodies run on fake tensors (see ``launch.py``).
CPU tests run the same ops with the kernels under ``TRITON_INTERPRET=1``.

Every kernel is deterministic (gathers only, no atomics). Shapes: T tokens, K slots,
N = T*K sorted rows, D hidden.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch.library import triton_op

from moe_dist.moe.kernels.launch import launcher


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    # A module constant, not functools.cache: torch.compile traces this call, and Dynamo warns
    # about (and ignores) cache wrappers in every compiled run.
    return _TRITON_INSTALLED


def _block_d(dim: int) -> int:
    return min(max(16, 1 << (dim - 1).bit_length()), 2048)


@functools.cache
def _kernels():
    # Built on first use, so TRITON_INTERPRET set by a test before the first call is honoured.
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows_kernel(x_ptr, src_ptr, valid_ptr, out_ptr, dim,
                           HAS_VALID: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_dim = cols < dim
        src = tl.load(src_ptr + row).to(tl.int64)
        vals = tl.load(x_ptr + src * dim + cols, mask=in_dim, other=0.0)
        if HAS_VALID:
            vals = tl.where(tl.load(valid_ptr + row) != 0, vals, 0.0)
        tl.store(out_ptr + row * dim + cols, vals, mask=in_dim)

    @triton.jit
    def gather_sum_kernel(y_ptr, inv_ptr, w_ptr, valid_ptr, out_ptr, dim,
                          TOP_K: tl.constexpr, HAS_W: tl.constexpr, HAS_VALID: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_dim = cols < dim
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            src = tl.load(inv_ptr + tok * TOP_K + k).to(tl.int64)
            vals = tl.load(y_ptr + src * dim + cols, mask=in_dim, other=0.0).to(tl.float32)
            if HAS_W:
                vals = vals * tl.load(w_ptr + tok * TOP_K + k).to(tl.float32)
            if HAS_VALID:  # invalid rows may hold anything (NaN included): select, not multiply
                vals = tl.where(tl.load(valid_ptr + tok * TOP_K + k) != 0, vals, 0.0)
            acc += vals
        tl.store(out_ptr + tok * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=in_dim)

    @triton.jit
    def scatter_grad_kernel(g_ptr, y_ptr, order_ptr, w_ptr, valid_ptr, grad_y_ptr, grad_w_ptr, dim,
                            TOP_K: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        assignment = tl.load(order_ptr + row).to(tl.int64)
        tok = assignment // TOP_K
        weight = tl.load(w_ptr + assignment).to(tl.float32)
        if HAS_VALID:
            keep = tl.load(valid_ptr + row) != 0
            weight = tl.where(keep, weight, 0.0)
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            in_dim = cols < dim
            g = tl.load(g_ptr + tok * dim + cols, mask=in_dim, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * dim + cols, mask=in_dim, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + row * dim + cols, (g * weight).to(grad_y_ptr.dtype.element_ty), mask=in_dim)
            dot += g * y
        total = tl.sum(dot, 0)
        if HAS_VALID:
            total = tl.where(keep, total, 0.0)
        tl.store(grad_w_ptr + assignment, total.to(grad_w_ptr.dtype.element_ty))

    return gather_rows_kernel, gather_sum_kernel, scatter_grad_kernel


def _flags(valid: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """Validity as uint8 for the kernels (a dummy pointer when there is none)."""
    return fallback if valid is None else valid.contiguous().view(torch.uint8)


def _check_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {tuple(x.shape)}")
    return x.contiguous()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# gather_rows: out[n] = x[src[n]] * valid[n]


def gather_rows_ref(x_TD: torch.Tensor, src_N: torch.Tensor, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    out = x_TD.index_select(0, src_N)
    return out if valid_N is None else torch.where(valid_N.unsqueeze(-1), out, 0.0)


@triton_op("moe_dist::gather_rows", mutates_args=())
def _gather_rows_op(x_TD: torch.Tensor, src_N: torch.Tensor, valid_N: Optional[torch.Tensor]) -> torch.Tensor:
    num_rows, dim = src_N.numel(), x_TD.shape[1]
    out = torch.empty(num_rows, dim, dtype=x_TD.dtype, device=x_TD.device)
    launch = launcher(_kernels()[0], x_TD)
    if launch is not None and num_rows and dim:
        block = _block_d(dim)
        launch[(num_rows, triton_cdiv(dim, block))](
            x_TD, src_N, _flags(valid_N, src_N), out, dim, HAS_VALID=valid_N is not None, BLOCK_D=block)
    return out


def gather_rows(x_TD: torch.Tensor, src_N: torch.Tensor, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`gather_rows_ref` (custom op ``moe_dist::gather_rows``, no autograd)."""
    return _gather_rows_op(_check_rows("x_TD", x_TD), src_N.contiguous(), valid_N)


# ---------------------------------------------------------------------------------------------
# weighted_gather_sum: out[t] = sum_k w[t,k] * y[inv[t,k]] over valid slots (fp32 accumulation)


def weighted_gather_sum_ref(y_ND: torch.Tensor, inv_TK: torch.Tensor, weights_TK: torch.Tensor | None = None,
                            valid_TK: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, top_k = inv_TK.shape
    rows = y_ND.index_select(0, inv_TK.reshape(-1)).view(num_tokens, top_k, -1).float()
    if valid_TK is not None:
        rows = torch.where(valid_TK.unsqueeze(-1), rows, 0.0)
    if weights_TK is not None:
        rows = rows * weights_TK.float().unsqueeze(-1)
    return rows.sum(1).to(y_ND.dtype)


@triton_op("moe_dist::weighted_gather_sum", mutates_args=())
def _weighted_gather_sum_op(y_ND: torch.Tensor, inv_TK: torch.Tensor, weights_TK: Optional[torch.Tensor],
                            valid_TK: Optional[torch.Tensor]) -> torch.Tensor:
    num_tokens, top_k = inv_TK.shape
    dim = y_ND.shape[1]
    out = torch.empty(num_tokens, dim, dtype=y_ND.dtype, device=y_ND.device)
    launch = launcher(_kernels()[1], y_ND)
    if launch is not None and num_tokens and dim:
        block = _block_d(dim)
        launch[(num_tokens, triton_cdiv(dim, block))](
            y_ND, inv_TK, weights_TK if weights_TK is not None else inv_TK, _flags(valid_TK, inv_TK), out, dim,
            TOP_K=top_k, HAS_W=weights_TK is not None, HAS_VALID=valid_TK is not None, BLOCK_D=block)
    return out


def weighted_gather_sum(y_ND: torch.Tensor, inv_TK: torch.Tensor, weights_TK: torch.Tensor | None = None,
                        valid_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`weighted_gather_sum_ref` (op ``moe_dist::weighted_gather_sum``)."""
    return _weighted_gather_sum_op(_check_rows("y_ND", y_ND), inv_TK.contiguous(),
                                   None if weights_TK is None else weights_TK.contiguous(), valid_TK)


# ---------------------------------------------------------------------------------------------
# scatter_grad: backward of the weighted un-permute


def scatter_grad_ref(g_TD: torch.Tensor, y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor,
                     valid_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    top_k = weights_TK.shape[1]
    g_rows = g_TD.index_select(0, order_N // top_k).float()
    if valid_N is not None:
        g_rows = torch.where(valid_N.unsqueeze(-1), g_rows, 0.0)
    w_rows = weights_TK.reshape(-1).index_select(0, order_N).float()
    grad_y = (g_rows * w_rows.unsqueeze(-1)).to(y_ND.dtype)
    dots = (g_rows * y_ND.float()).sum(-1)
    if valid_N is not None:
        dots = torch.where(valid_N, dots, 0.0)
    grad_w = torch.empty(order_N.numel(), dtype=weights_TK.dtype, device=y_ND.device)
    grad_w[order_N] = dots.to(weights_TK.dtype)
    return grad_y, grad_w.view_as(weights_TK)


@triton_op("moe_dist::scatter_grad", mutates_args=())
def _scatter_grad_op(g_TD: torch.Tensor, y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor,
                     valid_N: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, dim = y_ND.shape
    grad_y = torch.empty_like(y_ND)
    grad_w = torch.empty_like(weights_TK)
    launch = launcher(_kernels()[2], y_ND)
    if launch is not None and num_rows:
        launch[(num_rows,)](
            g_TD, y_ND, order_N, weights_TK, _flags(valid_N, order_N), grad_y, grad_w, dim,
            TOP_K=weights_TK.shape[1], HAS_VALID=valid_N is not None, BLOCK_D=_block_d(min(dim, 1024)))
    return grad_y, grad_w


def scatter_grad(g_TD: torch.Tensor, y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor,
                 valid_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`scatter_grad_ref` (op ``moe_dist::scatter_grad``)."""
    return _scatter_grad_op(_check_rows("g_TD", g_TD), _check_rows("y_ND", y_ND), order_N.contiguous(),
                            weights_TK.contiguous(), valid_N)


# ---------------------------------------------------------------------------------------------
# Differentiable permute and weighted un-permute (custom ops with registered autograd)


@triton_op("moe_dist::permute_rows", mutates_args=())
def _permute_rows_op(x_TD: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor,
                     valid_TK: Optional[torch.Tensor]) -> torch.Tensor:
    return _gather_rows_op(x_TD, order_N // inv_TK.shape[1], None)


def _permute_rows_setup(ctx, inputs, output) -> None:
    _, _, inv_TK, valid_TK = inputs
    ctx.save_for_backward(inv_TK, valid_TK)


def _permute_rows_backward(ctx, grad_ND):
    inv_TK, valid_TK = ctx.saved_tensors
    return weighted_gather_sum(grad_ND, inv_TK, None, valid_TK), None, None, None


_permute_rows_op.register_autograd(_permute_rows_backward, setup_context=_permute_rows_setup)


@triton_op("moe_dist::unpermute_weighted", mutates_args=())
def _unpermute_weighted_op(y_ND: torch.Tensor, weights_TK: torch.Tensor, order_N: torch.Tensor,
                           inv_TK: torch.Tensor, valid_N: Optional[torch.Tensor],
                           valid_TK: Optional[torch.Tensor]) -> torch.Tensor:
    return _weighted_gather_sum_op(y_ND, inv_TK, weights_TK, valid_TK)


def _unpermute_weighted_setup(ctx, inputs, output) -> None:
    y_ND, weights_TK, order_N, _, valid_N, _ = inputs
    ctx.save_for_backward(y_ND, weights_TK, order_N, valid_N)


def _unpermute_weighted_backward(ctx, grad_TD):
    y_ND, weights_TK, order_N, valid_N = ctx.saved_tensors
    grad_y, grad_w = scatter_grad(grad_TD, y_ND, order_N, weights_TK, valid_N)
    return grad_y, grad_w, None, None, None, None


_unpermute_weighted_op.register_autograd(_unpermute_weighted_backward, setup_context=_unpermute_weighted_setup)


class PermuteRows:
    """``x_sorted[n] = x[order[n] // K]``; backward sums each token's K rows (valid ones).

    ``use_triton``: the custom op ``moe_dist::permute_rows`` (Triton, traceable by
    ``torch.compile``), else the torch reference with torch's own autograd.
    """

    @staticmethod
    def apply(x_TD: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor,
              valid_TK: torch.Tensor | None, use_triton: bool) -> torch.Tensor:
        if not use_triton:
            return gather_rows_ref(x_TD, order_N // inv_TK.shape[1])
        return _permute_rows_op(_check_rows("x_TD", x_TD), order_N.contiguous(), inv_TK.contiguous(),
                                None if valid_TK is None else valid_TK.contiguous())


class UnpermuteWeighted:
    """``out[t] = sum_k w[t,k] * y[inv[t,k]]`` (valid slots only), with gradients for y and w.

    ``use_triton``: the custom op ``moe_dist::unpermute_weighted``, else the torch reference.
    """

    @staticmethod
    def apply(y_ND: torch.Tensor, weights_TK: torch.Tensor, order_N: torch.Tensor, inv_TK: torch.Tensor,
              valid_N: torch.Tensor | None, valid_TK: torch.Tensor | None, use_triton: bool) -> torch.Tensor:
        if not use_triton:
            return weighted_gather_sum_ref(y_ND, inv_TK, weights_TK, valid_TK)
        return _unpermute_weighted_op(
            _check_rows("y_ND", y_ND), weights_TK.contiguous(), order_N.contiguous(), inv_TK.contiguous(),
            None if valid_N is None else valid_N.contiguous(), None if valid_TK is None else valid_TK.contiguous())
