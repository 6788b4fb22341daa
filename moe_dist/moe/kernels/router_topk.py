"""Fused router softmax + top-k (Triton) beside its torch reference.

One pass over the fp32 logits ``[T, E]`` writes the softmax probabilities and the ids of the
``top_k`` largest (optionally bias-shifted) probabilities, in descending order like
``torch.topk(sorted=True)``; ties go to the lower expert id. The combine weights are gathered
from the probabilities by the caller, so the gradient flows through the probabilities only
(the selection has none). The Triton path is the custom op ``moe_dist::softmax_topk`` with
registered autograd, traceable by ``torch.compile`` without a graph break.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import triton_op

from moe_dist.moe.kernels.launch import launcher


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_topk_kernel(logits_ptr, bias_ptr, probs_ptr, idx_ptr, num_tokens, num_experts,
                            TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < num_tokens
        col_ok = cols < num_experts
        offs = rows.to(tl.int64)[:, None] * num_experts + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        logits = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))  # padded experts never win
        shifted = logits - tl.max(logits, axis=1)[:, None]
        num = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        probs = num / tl.sum(num, axis=1)[:, None]
        tl.store(probs_ptr + offs, probs, mask=mask)
        select = probs
        if HAS_BIAS:
            select = select + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        select = tl.where(col_ok[None, :], select, float("-inf"))
        for k in tl.static_range(TOP_K):
            best = tl.argmax(select, axis=1)  # first index among equal maxima
            tl.store(idx_ptr + rows.to(tl.int64) * TOP_K + k, best.to(tl.int64), mask=row_ok)
            select = tl.where(cols[None, :] == best[:, None], float("-inf"), select)

    return softmax_topk_kernel


def softmax_topk_ref(logits_TE: torch.Tensor, top_k: int,
                     bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [T, E] fp32, indices [T, K] int64) of the top_k of ``softmax + bias``."""
    probs = torch.softmax(logits_TE.float(), dim=-1)
    select = probs if bias_E is None else probs + bias_E
    _, indices = torch.topk(select.detach(), top_k, dim=-1, sorted=True)
    return probs, indices


@triton_op("moe_dist::softmax_topk", mutates_args=())
def _softmax_topk_op(logits_TE: torch.Tensor, top_k: int,
                     bias_E: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits_TE.shape
    probs = torch.empty_like(logits_TE)
    indices = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits_TE.device)
    launch = launcher(_kernel(), logits_TE)
    if launch is not None and num_tokens:
        block_e = max(16, 1 << (num_experts - 1).bit_length())
        block_t = max(1, min(64, 8192 // block_e))
        launch[(-(-num_tokens // block_t),)](
            logits_TE, bias_E if bias_E is not None else logits_TE, probs, indices, num_tokens, num_experts,
            TOP_K=top_k, HAS_BIAS=bias_E is not None, BLOCK_T=block_t, BLOCK_E=block_e)
    return probs, indices


def _softmax_topk_setup(ctx, inputs, output) -> None:
    probs, _ = output
    ctx.save_for_backward(probs)
    ctx.logits_dtype = inputs[0].dtype


def _softmax_topk_backward(ctx, grad_probs, _grad_indices):
    (probs,) = ctx.saved_tensors
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    return grad_logits.to(ctx.logits_dtype), None, None


_softmax_topk_op.register_autograd(_softmax_topk_backward, setup_context=_softmax_topk_setup)


def _check_top_k(logits_TE: torch.Tensor, top_k: int) -> None:
    num_experts = logits_TE.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")


def softmax_topk_forward(logits_TE: torch.Tensor, top_k: int,
                         bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`softmax_topk_ref` without autograd."""
    with torch.no_grad():
        return softmax_topk(logits_TE, top_k, bias_E)


def softmax_topk(logits_TE: torch.Tensor, top_k: int,
                 bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (through the probabilities) fused softmax + top-k: the custom op
    ``moe_dist::softmax_topk`` on fp32 logits (a cast is differentiated by torch)."""
    _check_top_k(logits_TE, top_k)
    bias = None if bias_E is None else bias_E.detach().float().contiguous()
    return _softmax_topk_op(logits_TE.float().contiguous(), top_k, bias)
