"""PEER: parameter-efficient expert retrieval (He, arXiv 2407.04153; ALGORITHMS.md section 3).

A PEER layer holds N = n*n single-neuron experts ``e_i(x) = phi(u_i . x) v_i``, with the down
vectors u and up vectors v stored as two embedding tables ``U, V: [N, D]``. Per retrieval head
i = 1..h and token x:

1. query ``q = norm(x W_q^i)`` in R^{d_k} (norm: BatchNorm over the batch as in the paper,
   LayerNorm per token, or none; ``model.peer.query_norm``);
2. split q into halves q1, q2 and score them against two shared sub-key tables
   ``C1, C2: [n, d_k/2]``; take the top-k of each half;
3. the k*k candidates (a, b) score ``c1[a] + c2[b]`` and name expert ``a*n + b``; keep their
   top-k. This is exact: a pair in the global top-k has both halves in their top-k, so the
   result equals a brute-force top-k over all N experts (tests/unit);
4. ``g = softmax`` of the k kept scores; head output ``sum_j g_j phi(u_j . x) v_j``.

The layer output is the sum over heads. No balancing loss.

Memory: only the retrieved rows are gathered ([T, h*k, D] for u and for v); nothing of size
N x D is ever built besides the tables themselves and their gradients. Row retrieval goes
through ``self.table_lookup`` -- :class:`LocalTableLookup` here, or the expert-parallel lookup of
``moe_dist.models.arch_parallel`` that fetches rows from the rank owning them (this file
imports no torch.distributed).

Expert-load stats count retrievals per first sub-key ``a`` (n buckets of n experts each), so
that the tracker and its heat map stay n wide rather than N.

Shapes: T tokens, D model dim, H retrieval heads, K top_k, Q = d_k, n = sqrt(N).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, PEERConfig
from moe_dist.models.arch_base import ArchTransformer
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.stats import ExpertLoadStats


class TableLookup(Protocol):
    """Rows ``indices`` (global expert ids, [M]) of each table, as ``[M, width]`` tensors."""

    def __call__(self, indices_M: torch.Tensor, *tables: torch.Tensor) -> list[torch.Tensor]: ...


class LocalTableLookup:
    """Every row is local: an embedding gather per table."""

    def __call__(self, indices_M: torch.Tensor, *tables: torch.Tensor) -> list[torch.Tensor]:
        return [F.embedding(indices_M, table) for table in tables]


def product_key_topk(q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor,
                     top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the n*n sums ``q1.keys1[a] + q2.keys2[b]`` without forming them.

    ``q1, q2: [..., Q/2]``, ``keys: [n, Q/2]``. Returns (scores [..., K] descending,
    expert ids a*n + b [..., K]).
    """
    n = keys1.shape[0]
    s1, i1 = torch.topk(q1 @ keys1.t(), top_k, dim=-1)  # [..., K]
    s2, i2 = torch.topk(q2 @ keys2.t(), top_k, dim=-1)
    candidates = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [..., K*K], a-major
    scores, flat = torch.topk(candidates, top_k, dim=-1)
    ids = i1.gather(-1, flat // top_k) * n + i2.gather(-1, flat % top_k)
    return scores, ids


class PEERLayer(nn.Module):
    """A PEER MLP replacement; ``forward`` returns ``(out, {})`` like an MoE layer."""

    def __init__(self, dim: int, cfg: PEERConfig) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = cfg.num_experts
        self.side = math.isqrt(cfg.num_experts)
        self.heads = cfg.heads
        self.top_k = cfg.top_k
        self.query_dim = cfg.query_dim or dim
        if self.query_dim % 2 != 0:
            raise ConfigError(f"PEER query width {self.query_dim} must be even; set model.peer.query_dim")
        self.activation = F.gelu if cfg.activation == "gelu" else F.relu
        self.query = nn.Linear(dim, self.heads * self.query_dim, bias=False)
        if cfg.query_norm == "batchnorm":
            self.query_norm: nn.Module = nn.BatchNorm1d(self.heads * self.query_dim)
        elif cfg.query_norm == "layernorm":
            self.query_norm = nn.LayerNorm(self.query_dim)
        else:
            self.query_norm = nn.Identity()
        self.norm_kind = cfg.query_norm
        self.sub_keys = nn.Parameter(torch.empty(2, self.side, self.query_dim // 2))
        # _weight skips nn.Embedding's own N(0, 1) init: at N = 1024^2 every init pass counts.
        self.down = nn.Embedding(cfg.num_experts, dim, _weight=torch.empty(cfg.num_experts, dim))  # u
        self.up = nn.Embedding(cfg.num_experts, dim, _weight=torch.empty(cfg.num_experts, dim))  # v
        self.table_lookup: TableLookup = LocalTableLookup()
        self.stats = ExpertLoadStats(self.side)
        self.reset_arch_parameters(0.02, 0.02)

    @torch.no_grad()
    def reset_arch_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.query.weight, std=std)
        nn.init.normal_(self.sub_keys, std=1.0 / math.sqrt(self.query_dim // 2))
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(self.dim))  # u . x ~ N(0, 1) for RMS-1 x
        nn.init.normal_(self.up.weight, std=out_std)

    def set_table_lookup(self, lookup: TableLookup) -> None:
        self.table_lookup = lookup

    def queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        q = self.query(x_TD)  # [T, H*Q]
        if self.norm_kind == "batchnorm":
            q = self.query_norm(q) if q.shape[0] > 1 or not self.training else q
            return q.view(-1, self.heads, self.query_dim)
        return self.query_norm(q.view(-1, self.heads, self.query_dim))

    def retrieve(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [T, H, K] fp32, expert ids [T, H, K])."""
        q1, q2 = self.queries(x_TD).float().chunk(2, dim=-1)
        keys = self.sub_keys.float()
        return product_key_topk(q1, q2, keys[0], keys[1], self.top_k)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, self.dim)
        num_tokens = x_TD.shape[0]
        scores, ids = self.retrieve(x_TD)
        gates = torch.softmax(scores, dim=-1).reshape(num_tokens, -1)  # [T, H*K]
        u, v = self.table_lookup(ids.reshape(-1), self.down.weight, self.up.weight)
        u = u.view(num_tokens, -1, self.dim).to(x_TD.dtype)  # [T, H*K, D]
        v = v.view(num_tokens, -1, self.dim).to(x_TD.dtype)
        hidden = self.activation(torch.einsum("td,tmd->tm", x_TD, u))  # [T, H*K]
        out = torch.einsum("tm,tmd->td", hidden * gates.to(hidden.dtype), v)
        if self.training:
            self._record(ids)
        return out.view(shape), {}

    @torch.no_grad()
    def _record(self, ids: torch.Tensor) -> None:
        counts = count_per_expert((ids // self.side).flatten(), self.side)  # no host sync on CUDA
        self.stats.update(counts, counts, ids.shape[0])

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward: query projection and sub-key scores (router), h*k experts of 2 dot products."""
        router = 2 * self.dim * self.heads * self.query_dim + 2 * self.heads * self.side * self.query_dim
        experts = self.heads * self.top_k * 2 * 2 * self.dim
        return {"router": float(router), "experts": float(experts)}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts} ({self.side}^2), heads={self.heads}, top_k={self.top_k}, "
                f"query_dim={self.query_dim}, query_norm={self.norm_kind}")


class PEERTransformer(ArchTransformer):
    """The blocks that ``moe.every`` makes MoE get a PEER layer as their MLP instead."""

    def install(self) -> None:
        if not self.moe_cfg.enabled:
            raise ConfigError("model.arch=peer replaces the MoE MLPs picked by moe.every; set moe.every >= 1 "
                              "and moe.num_experts > 0 (the PEER pool size is model.peer.num_experts)")
        for block in self.layers:
            if block.is_moe:
                block.mlp = PEERLayer(self.model_cfg.dim, self.model_cfg.peer)
