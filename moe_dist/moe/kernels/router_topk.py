"""Fused router softmax + top-k (Triton) beside its torch reference.

One pass over the fp32 logits ``[T, E]`` writes the softmax probabilities and the ids of the
``top_k`` largest (optionally bias-shifted) probabilities, in descending order like
``torch.topk(sorted=True)``; ties go to the lower expert id. The combine weights are gathered
from the probabilities by the caller, so the gradient flows through the probabilities only
(the selection has none).
"""

from __future__ import annotations

import functools

import torch


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


def softmax_topk_forward(logits_TE: torch.Tensor, top_k: int,
                         bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`softmax_topk_ref` without autograd."""
    num_tokens, num_experts = logits_TE.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
    logits = logits_TE.float().contiguous()
    probs = torch.empty_like(logits)
    indices = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return probs, indices
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    block_t = max(1, min(64, 8192 // block_e))
    grid = (-(-num_tokens // block_t),)
    bias = bias_E.float().contiguous() if bias_E is not None else logits
    _kernel()[grid](logits, bias, probs, indices, num_tokens, num_experts,
                    TOP_K=top_k, HAS_BIAS=bias_E is not None, BLOCK_T=block_t, BLOCK_E=block_e)
    return probs, indices


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, top_k, bias_E):
        probs, indices = softmax_topk_forward(logits_TE, top_k, bias_E)
        ctx.save_for_backward(probs)
        ctx.mark_non_differentiable(indices)
        return probs, indices

    @staticmethod
    def backward(ctx, grad_probs, _grad_indices):
        (probs,) = ctx.saved_tensors
        grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        return grad_logits, None, None


def softmax_topk(logits_TE: torch.Tensor, top_k: int,
                 bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (through the probabilities) fused softmax + top-k."""
    return _SoftmaxTopK.apply(logits_TE, top_k, bias_E)
