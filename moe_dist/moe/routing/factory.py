"""``build_router(dim, num_experts, cfg)``: the router that ``moe.router.type`` names."""

from __future__ import annotations

from torch import nn

from moe_dist.config import ConfigError, RouterConfig
from moe_dist.moe.routing.expert_choice import ExpertChoiceRouter
from moe_dist.moe.routing.top_any import TopAnyRouter
from moe_dist.moe.routing.top_k import TopKRouter
from moe_dist.moe.routing.variable_k import DAMoERouter, TopPRouter, XMoERouter

ROUTERS: dict[str, type[nn.Module]] = {
    "softmax_topk": TopKRouter,
    "sigmoid_topk": TopKRouter,
    "top_p": TopPRouter,
    "xmoe": XMoERouter,
    "da_moe": DAMoERouter,
    "top_any": TopAnyRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(dim: int, num_experts: int, cfg: RouterConfig) -> nn.Module:
    """The router named by ``cfg.type``."""
    if cfg.type not in ROUTERS:
        raise ConfigError(f"moe.router.type ({cfg.type!r}) is not a router; use one of {list(ROUTERS)}")
    return ROUTERS[cfg.type](dim, num_experts, cfg)
