"""Token cross-entropy of the LM head without fp32 copies of the whole logits tensor.

``F.cross_entropy(logits.float(), targets)`` on bf16 logits ``[N, V]`` writes an fp32 copy of
the logits, the fp32 log-softmax and, in the backward, an fp32 one-hot gradient, the fp32
softmax gradient and its bf16 cast: about 20 bytes moved per logit. For the 16384 x 32768 logits
of the benchmark step that is ~10 GB per step. The Triton path here reads the logits once in the
forward (an online log-sum-exp per row, fp32 arithmetic) and once more in the backward, where it
writes the gradient directly in the logits' dtype: 6 bytes per bf16 logit.

:func:`token_cross_entropy` is the entry point: the Triton path on CUDA, and on every other
device exactly ``F.cross_entropy(logits.float(), targets)`` (so CPU runs are unchanged).
:func:`fused_cross_entropy` runs the Triton path on any device (tests run it on CPU through
``TRITON_INTERPRET=1``). Both take the mean over the targets that are not ``ignore_index``.
The kernels run inside ``torch.library.triton_op`` custom ops (``moe_dist::cross_entropy_rows``
with registered autograd), so ``torch.compile`` traces the loss without a graph break.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.library import triton_op

from moe_dist.moe.kernels.launch import launcher
from moe_dist.moe.kernels.permute import triton_available


@functools.cache
def _kernels():
    # Built on first use, so TRITON_INTERPRET set by a test before the first call is honoured.
    import triton
    import triton.language as tl

    @triton.jit
    def ce_forward_kernel(x_ptr, targets_ptr, loss_ptr, max_ptr, logsum_ptr, vocab, ignore_index,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * vocab
        # Online log-sum-exp over the row: running maximum and the sum of exp(x - maximum).
        # Every block holds at least one real logit, so the maximum is finite after block one.
        run_max = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0) - float("inf")
        run_sum = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, 0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            run_max = new_max
        log_sum = tl.log(run_sum)
        target = tl.load(targets_ptr + row)
        keep = target != ignore_index
        x_target = tl.load(x_row + tl.where(keep, target, 0)).to(tl.float32)
        tl.store(max_ptr + row, run_max)
        tl.store(logsum_ptr + row, log_sum)
        # (max - x_t) + log_sum, like log_softmax's (x - max) - log_sum: the difference of two
        # large logits is taken before anything is added (no cancellation at |x| >> 1).
        tl.store(loss_ptr + row, tl.where(keep, (run_max - x_target) + log_sum, 0.0))

    @triton.jit
    def ce_backward_kernel(x_ptr, targets_ptr, max_ptr, logsum_ptr, grad_ptr, dx_ptr, vocab, ignore_index,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row)
        scale = tl.where(target != ignore_index, tl.load(grad_ptr + row).to(tl.float32), 0.0)
        row_max = tl.load(max_ptr + row)
        log_sum = tl.load(logsum_ptr + row)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(x_ptr + row * vocab + cols, mask=mask, other=float("-inf")).to(tl.float32)
            # d loss / dx = softmax(x) - onehot(target), softmax as exp of log_softmax's terms
            d = (tl.exp((x - row_max) - log_sum) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(dx_ptr + row * vocab + cols, d.to(dx_ptr.dtype.element_ty), mask=mask)

    return ce_forward_kernel, ce_backward_kernel


def _launch_config(vocab: int, block: int | None) -> tuple[int, int]:
    if block is None:
        block = min(max(16, 1 << (vocab - 1).bit_length()), 4096)
    if block & (block - 1):
        raise ValueError(f"cross-entropy block must be a power of two, got {block}")
    return block, (8 if block >= 2048 else 4)


@triton_op("moe_dist::cross_entropy_rows", mutates_args=())
def _ce_rows_op(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int, block: int,
                warps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses ``logsumexp(x_n) - x_n[t_n]`` (0 where ``t_n == ignore_index``), with the
    row maxima and log-sums the backward reuses."""
    rows, vocab = logits_NV.shape
    losses_N = torch.empty(rows, dtype=torch.float32, device=logits_NV.device)
    max_N, logsum_N = torch.empty_like(losses_N), torch.empty_like(losses_N)
    launch = launcher(_kernels()[0], logits_NV)
    if launch is not None and rows:
        launch[(rows,)](logits_NV, targets_N, losses_N, max_N, logsum_N, vocab, ignore_index,
                        BLOCK=block, num_warps=warps)
    return losses_N, max_N, logsum_N


@triton_op("moe_dist::cross_entropy_rows_backward", mutates_args=())
def _ce_rows_backward_op(logits_NV: torch.Tensor, targets_N: torch.Tensor, max_N: torch.Tensor,
                         logsum_N: torch.Tensor, grad_N: torch.Tensor, ignore_index: int, block: int,
                         warps: int) -> torch.Tensor:
    rows, vocab = logits_NV.shape
    grad_logits = torch.empty_like(logits_NV)
    launch = launcher(_kernels()[1], logits_NV)
    if launch is not None and rows:
        launch[(rows,)](logits_NV, targets_N, max_N, logsum_N, grad_N, grad_logits, vocab, ignore_index,
                        BLOCK=block, num_warps=warps)
    return grad_logits


def _ce_setup(ctx, inputs, output) -> None:
    logits_NV, targets_N, ignore_index, block, warps = inputs
    _, max_N, logsum_N = output
    ctx.save_for_backward(logits_NV, targets_N, max_N, logsum_N)
    ctx.launch_args = (ignore_index, block, warps)


def _ce_backward(ctx, grad_N, _grad_max, _grad_logsum):
    logits_NV, targets_N, max_N, logsum_N = ctx.saved_tensors
    grad_logits = _ce_rows_backward_op(logits_NV, targets_N, max_N, logsum_N, grad_N.contiguous(), *ctx.launch_args)
    return grad_logits, None, None, None, None


_ce_rows_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        block: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``ignore_index``, through the Triton
    kernels on any device. ``logits [..., V]`` (any float dtype; math in fp32), ``targets [...]``.

    ``block`` (a power of two) is the number of vocabulary entries a program handles per loop
    step; tests set it small to cover several steps and a ragged last one.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {list(logits.shape)} and targets {list(targets.shape)} disagree: "
                         f"targets must be logits.shape[:-1]")
    logits_NV = logits.reshape(-1, logits.shape[-1]).contiguous()
    targets_N = targets.reshape(-1).contiguous()
    block, warps = _launch_config(logits_NV.shape[-1], block)
    losses_N, _, _ = _ce_rows_op(logits_NV, targets_N, ignore_index, block, warps)
    count = (targets_N != ignore_index).sum()  # on the device: no host sync
    return losses_N.sum() / count


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of ``logits [..., V]`` against ``targets [...]`` in fp32.

    CUDA: the fused Triton path (no fp32 copy of the logits). Elsewhere:
    ``F.cross_entropy(logits.float(), targets)``, bit for bit.
    """
    if logits.is_cuda and triton_available():
        return fused_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
