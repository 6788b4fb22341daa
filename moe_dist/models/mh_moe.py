"""Multi-Head MoE (Wu et al., arXiv 2404.15045; parity version Huang et al., arXiv 2411.16205;
ALGORITHMS.md section 4).

For a token x in R^D and h heads:

1. head projection ``x_hat = x W_head`` (D x D);
2. split x_hat into h sub-tokens of width D/h, in (token, head) order;
3. route every sub-token through an ordinary MoE (:class:`MoELayer` over the T*h sub-tokens:
   router, capacity and balance loss all count sub-tokens; experts map D/h -> D' -> D/h);
4. put the h outputs back side by side and merge: ``y = z W_merge``.

Parity with the plain MoE of the moe section (E experts of hidden D, top-k, c = 3 matmuls per
SwiGLU expert) keeps k' = k and solves (ALGORITHMS.md section 4(c))::

    params:  E*c*D*Dh            = 2*D^2 + E'*c*(D/h)*D'
    FLOPs:   k*c*D*Dh (x2)       = 2*D^2 + k*c*D*D'      (h sub-tokens x k x (D/h)*D')  (x2)

    =>  D' = Dh - 2*D/(c*k),   E' = h*(E*Dh - 2*D/c) / D'

(Dh is the plain expert's hidden size). Router weights (D*E vs (D/h)*E') are left out of the
balance, as in the paper. Non-integer solutions are replaced by the nearby integer (E', D')
with the smallest worst-case ratio error; :func:`matched_sub_experts` reports
the resulting parameter and FLOP ratios. With h = 1, ``match_moe=false`` and identity head and
merge, the layer is exactly the plain MoE (tests/unit).

The inner MoELayer is sharded by ``apply_ep`` like any MoE MLP: E' must be divisible by ep
(``model.mh_moe.num_experts`` overrides the derived count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_dist.config import ConfigError, MHMoEConfig, MoEConfig
from moe_dist.models.arch_base import ArchTransformer, moe_layer_flops
from moe_dist.moe.layer import MoELayer

SWIGLU_MATMULS = 3


@dataclass(frozen=True)
class SubExperts:
    num_experts: int
    """E': experts of the sub-token MoE."""
    ffn_dim: int
    """D': hidden size of one sub-token expert."""
    param_ratio: float
    """(head + merge + sub-token experts) / plain MoE experts, parameters."""
    flops_ratio: float
    """The same ratio for forward FLOPs per token."""


def matched_sub_experts(dim: int, num_experts: int, ffn_dim: int, top_k: int, heads: int,
                        matmuls: int = SWIGLU_MATMULS) -> SubExperts:
    """(E', D') of an MH-MoE with the parameters and FLOPs of the plain MoE (see module doc)."""
    exact_ffn = ffn_dim - 2 * dim / (matmuls * top_k)
    if exact_ffn < 1:
        raise ConfigError(f"MH-MoE parity leaves no room for experts: moe.expert_ffn_dim ({ffn_dim}) must exceed "
                          f"2*model.dim/(3*top_k) = {2 * dim / (matmuls * top_k):.1f} to pay for the head and "
                          "merge projections; raise expert_ffn_dim or set model.mh_moe.match_moe=false")
    # Integer neighbours of the exact solution; keep the one with the smallest worst ratio error.
    best: SubExperts | None = None
    for sub_ffn in range(max(int(exact_ffn) - 4, 1), int(exact_ffn) + 6):
        exact_experts = heads * (num_experts * ffn_dim - 2 * dim / matmuls) / sub_ffn
        for sub_experts in {max(math.floor(exact_experts), top_k), max(math.ceil(exact_experts), top_k)}:
            found = _ratios(dim, num_experts, ffn_dim, top_k, heads, sub_experts, sub_ffn, matmuls)
            if best is None or _error(found) < _error(best):
                best = found
    assert best is not None
    return best


def _error(sub: SubExperts) -> float:
    return max(abs(sub.param_ratio - 1), abs(sub.flops_ratio - 1))


def _ratios(dim, num_experts, ffn_dim, top_k, heads, sub_experts, sub_ffn, matmuls=SWIGLU_MATMULS) -> SubExperts:
    plain_params = num_experts * matmuls * dim * ffn_dim
    mh_params = 2 * dim * dim + sub_experts * matmuls * (dim // heads) * sub_ffn
    plain_flops = top_k * matmuls * dim * ffn_dim
    mh_flops = 2 * dim * dim + top_k * matmuls * dim * sub_ffn
    return SubExperts(sub_experts, sub_ffn, mh_params / plain_params, mh_flops / plain_flops)


def sub_experts_for(dim: int, ffn_dim: int, moe_cfg: MoEConfig, cfg: MHMoEConfig) -> SubExperts:
    """The (E', D') a layer uses: explicit overrides, else parity-derived or the moe section's."""
    plain_ffn = moe_cfg.expert_ffn_dim or ffn_dim
    top_k = moe_cfg.router.top_k
    if cfg.match_moe:
        derived = matched_sub_experts(dim, moe_cfg.num_experts, plain_ffn, top_k, cfg.heads)
        num, ffn = derived.num_experts, derived.ffn_dim
    else:
        num, ffn = moe_cfg.num_experts, plain_ffn
    num, ffn = cfg.num_experts or num, cfg.expert_ffn_dim or ffn
    return _ratios(dim, moe_cfg.num_experts, plain_ffn, top_k, cfg.heads, num, ffn)


class MHMoELayer(nn.Module):
    """Head projection -> h sub-tokens through an MoELayer -> merge projection."""

    def __init__(self, dim: int, ffn_dim: int, moe_cfg: MoEConfig, cfg: MHMoEConfig) -> None:
        super().__init__()
        if dim % cfg.heads != 0:
            raise ConfigError(f"model.dim ({dim}) must be divisible by model.mh_moe.heads ({cfg.heads}); use heads "
                              f"in {[h for h in range(1, 9) if dim % h == 0]}")
        self.dim = dim
        self.heads = cfg.heads
        self.sub = sub_experts_for(dim, ffn_dim, moe_cfg, cfg)
        if self.sub.num_experts < moe_cfg.router.top_k:
            raise ConfigError(f"MH-MoE sub-token experts ({self.sub.num_experts}) must be >= moe.router.top_k "
                              f"({moe_cfg.router.top_k}); raise model.mh_moe.num_experts")
        sub_cfg = dataclasses.replace(moe_cfg, num_experts=self.sub.num_experts, expert_ffn_dim=self.sub.ffn_dim)
        self.head = nn.Linear(dim, dim, bias=False)
        self.merge = nn.Linear(dim, dim, bias=False)
        self.moe = MoELayer(dim // cfg.heads, self.sub.ffn_dim, sub_cfg)

    @torch.no_grad()
    def reset_arch_parameters(self, std: float, out_std: float) -> None:
        nn.init.xavier_uniform_(self.head.weight, gain=1 / math.sqrt(2))  # as the reference code
        nn.init.xavier_uniform_(self.merge.weight)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, seq_len, dim = x_BSD.shape
        sub_tokens = self.head(x_BSD).reshape(batch, seq_len * self.heads, dim // self.heads)  # (token, head)
        out, losses = self.moe(sub_tokens)
        return self.merge(out.reshape(batch, seq_len, dim)), losses

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward: head and merge (dense), and h sub-tokens through the sub-token MoE."""
        inner = moe_layer_flops(self.moe)
        return {"dense": 2.0 * 2 * self.dim * self.dim + self.heads * inner["dense"],
                "router": self.heads * inner["router"], "experts": self.heads * inner["experts"]}

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, sub_experts={self.sub.num_experts}, sub_ffn_dim={self.sub.ffn_dim}, "
                f"param_ratio={self.sub.param_ratio:.4f}, flops_ratio={self.sub.flops_ratio:.4f}")


class MHMoETransformer(ArchTransformer):
    """The MoE blocks (``moe.every``) get an MH-MoE MLP."""

    def install(self) -> None:
        if not self.moe_cfg.enabled:
            raise ConfigError("model.arch=mh_moe needs MoE blocks: set moe.num_experts > 0 and moe.every >= 1")
        for block in self.layers:
            if block.is_moe:
                block.mlp = MHMoELayer(self.model_cfg.dim, self.model_cfg.ffn_dim, self.moe_cfg, self.model_cfg.mh_moe)
