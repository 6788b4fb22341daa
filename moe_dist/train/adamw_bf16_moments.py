"""AdamW that keeps its two moments in bf16 (``train.optimizer_state_dtype=bf16``).

Why: the optimizer step of an MoE model scales with its *total* parameters and is bound by
memory traffic. torch's fused AdamW moves 28 bytes per fp32 parameter (parameter, gradient and
both moments read, parameter and moments written); with bf16 moments it is 20, about 29% less.
DeepSeek-V3 trains with bf16 moments "without observable performance degradation" (its
section 3.3.2); Megatron-core offers the same as ``exp_avg_dtype`` / ``exp_avg_sq_dtype``.

The math is torch's AdamW (decoupled decay, bias correction, ``eps`` outside the square root),
in fp32: each step loads the moments, updates them in fp32, updates the parameter with those
fp32 values, and stores the moments back rounded to the nearest bf16 (no stochastic rounding).
On CUDA one Triton kernel per parameter does all of it in one pass; elsewhere the same
arithmetic runs as torch ops. Hyper-parameters live in ``param_groups`` as in
``torch.optim.AdamW``, so the learning-rate scheduler and checkpoints treat it the same way.
"""

from __future__ import annotations

import functools

import torch

from moe_dist.moe.kernels.permute import triton_available

_BLOCK = 2048


@functools.cache
def _kernel():
    # Built on first use, so TRITON_INTERPRET set by a test before the first call is honoured.
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_bf16_moments_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr, numel,
                                  beta1, beta2, eps, decay, step_size, inv_sqrt_bc2,
                                  HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < numel
        param = tl.load(param_ptr + offsets, mask=ok).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=ok).to(tl.float32)
        if HAS_GRAD_SCALE:
            grad = grad / tl.load(grad_scale_ptr)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=ok).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=ok).to(tl.float32)
        param = param * decay
        exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
        exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
        param = param - step_size * exp_avg / (tl.sqrt(exp_avg_sq) * inv_sqrt_bc2 + eps)
        tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=ok)
        tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=ok)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=ok)

    return adamw_bf16_moments_kernel


def _step_torch(param, grad, exp_avg, exp_avg_sq, grad_scale, beta1, beta2, eps, decay, step_size,
                inv_sqrt_bc2) -> None:
    """The kernel's arithmetic as torch ops (fp32), for devices without the Triton path."""
    value = param.float().mul_(decay)
    grad = grad.float() if grad_scale is None else grad.float() / grad_scale
    avg = exp_avg.float()
    avg.add_(grad - avg, alpha=1.0 - beta1)
    avg_sq = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    value.sub_(step_size * avg / (avg_sq.sqrt() * inv_sqrt_bc2 + eps))
    param.copy_(value)
    exp_avg.copy_(avg)
    exp_avg_sq.copy_(avg_sq)


def use_kernel(param: torch.Tensor) -> bool:
    return param.is_cuda and triton_available()


class AdamWBf16Moments(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with ``exp_avg`` and ``exp_avg_sq`` stored in bf16 (see the module).

    The state per parameter is torch AdamW's: ``step`` (an fp32 scalar on the CPU, read on the
    host without a device sync), ``exp_avg``, ``exp_avg_sq``. Moments that arrive in another
    dtype (a checkpoint of torch's AdamW) are converted to bf16 at the next step.

    Like torch's fused AdamW, the step divides every gradient by ``self.grad_scale`` when that
    attribute is a (device) tensor: gradient clipping without a pass of its own
    (:func:`moe_dist.train.optim.set_clip_scale`). Unlike torch's, it leaves ``.grad`` unscaled.
    """

    state_dtype = torch.bfloat16
    """The dtype of the per-element state, for checkpoint loaders (``distributed/checkpoint.py``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"AdamWBf16Moments: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdamWBf16Moments does not take sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(param, dtype=self.state_dtype,
                                                      memory_format=torch.contiguous_format)
                if state["step"].device.type != "cpu":  # from a fused AdamW's state: once, then on the host
                    state["step"] = state["step"].cpu()
                for key in ("exp_avg", "exp_avg_sq"):  # torch's loader casts state to the param dtype
                    if state[key].dtype != self.state_dtype or not state[key].is_contiguous():
                        state[key] = state[key].to(self.state_dtype, memory_format=torch.contiguous_format)
                state["step"] = state["step"] + 1  # not in place: a loaded state dict may share it
                step = int(state["step"].item())  # a CPU tensor: no device sync
                bias_correction1 = 1.0 - beta1 ** step
                bias_correction2 = 1.0 - beta2 ** step
                args = (beta1, beta2, eps, 1.0 - lr * group["weight_decay"], lr / bias_correction1,
                        1.0 / bias_correction2 ** 0.5)
                self._update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], grad_scale, args)
        return loss

    @staticmethod
    def _update(param, grad, exp_avg, exp_avg_sq, grad_scale, args) -> None:
        if use_kernel(param) and param.is_contiguous() and grad.is_contiguous():
            numel = param.numel()
            scale = grad_scale if grad_scale is not None else grad  # any pointer: not read then
            _kernel()[(-(-numel // _BLOCK),)](param, grad, exp_avg, exp_avg_sq, scale, numel, *args,
                                              HAS_GRAD_SCALE=grad_scale is not None, BLOCK=_BLOCK)
        else:
            _step_torch(param, grad, exp_avg, exp_avg_sq, grad_scale, *args)
