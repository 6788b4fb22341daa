"""AdamW with decoupled weight decay on matrices only, and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_dist.config import TrainConfig
from moe_dist.train.adamw_bf16_moments import AdamWBf16Moments


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (and expert weight stacks) decay; norms, biases and router vectors do not."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def adamw_implementation(impl: str, prefer_fused: bool) -> dict:
    """``torch.optim.AdamW`` keyword arguments for ``train.optimizer_impl``; 'auto' is 'fused'
    where ``prefer_fused`` (the caller knows the device and the sharding), else 'for_loop'."""
    if impl == "auto":
        impl = "fused" if prefer_fused else "for_loop"
    return dict(_IMPLEMENTATIONS[impl])


def fused_by_default(device: torch.device, fsdp: bool) -> bool:
    """The native engine's 'auto': fused AdamW on CUDA; FSDP2 keeps the loop (fused over its
    DTensor shards is tested on gloo only, so it is opt-in)."""
    return device.type == "cuda" and not fsdp


def build_optimizer(model: nn.Module, cfg: TrainConfig, prefer_fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, implemented as ``cfg.optimizer_impl`` says, or with bf16
    moments (``cfg.optimizer_state_dtype``)."""
    groups, hyper = param_groups(model, cfg.weight_decay), dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if cfg.optimizer_state_dtype == "bf16":
        return AdamWBf16Moments(groups, **hyper)
    return torch.optim.AdamW(groups, **hyper, **adamw_implementation(cfg.optimizer_impl, prefer_fused))


def clips_inside_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` divides the gradients by ``optimizer.grad_scale`` in its own
    kernel: torch's fused AdamW (GradScaler's hook) and :class:`AdamWBf16Moments`. Clipping through
    it reads the gradients once (the norm) instead of three times (the norm, then a scaling pass)."""
    if isinstance(optimizer, AdamWBf16Moments):
        return True
    return type(optimizer) is torch.optim.AdamW and all(group.get("fused") for group in optimizer.param_groups)


def set_clip_scale(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, max_norm: float) -> None:
    """Clip in the next ``optimizer.step()``: ``grad_scale = 1 / min(1, max_norm / (norm + 1e-6))``,
    torch's ``clip_grad_norm_`` rule, as a device tensor (no host sync); none for max_norm 0 or inf."""
    if max_norm > 0 and math.isfinite(max_norm):
        optimizer.grad_scale = ((grad_norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    else:
        optimizer.grad_scale = None


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
