"""MoELayer = router -> capacity policy -> dispatcher -> grouped experts -> combine
(+ shared experts).

The layer is written for one device. Expert parallelism replaces ``self.dispatcher`` with an
all-to-all dispatcher and slices ``self.experts`` to the local shard (``apply_ep``); nothing
else changes, which is what makes the single-process twin an exact reference.

Overlap (the same math as the plain order, which is what runs on the CPU by default):

* ``moe.overlap_shared_experts`` on CUDA (eager): the shared experts start on a side stream
  before routing (:mod:`~moe_dist.moe.side_stream`) and are joined at the final sum;
* ``moe.dispatch_chunks > 1`` under expert parallelism: the all-to-all dispatcher exchanges the
  rows in chunks overlapped with the experts (:mod:`~moe_dist.moe.dispatch.pipelined`); off CUDA
  the shared experts then run while the first chunk's exchange is in flight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import MoEConfig
from moe_dist.moe import capacity as cap
from moe_dist.moe import capacity_dynamic
from moe_dist.moe.capacity_dynamic import CapacityState
from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher
from moe_dist.moe.dispatch.local import LocalDispatcher
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.dispatch.pipelined import run_pipelined
from moe_dist.moe.dispatch.protocol import Dispatcher
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.routing.factory import build_router
from moe_dist.moe.routing.result import RoutingResult
from moe_dist.moe.side_stream import SideWork, can_use_side_stream, start_on_side_stream
from moe_dist.moe.stats import ExpertLoadStats


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def start_on_side_stream(self, x: torch.Tensor) -> SideWork:
        """``forward(x)`` issued on the side CUDA stream (see :mod:`~moe_dist.moe.side_stream`).

        The weights are viewed on the current stream first: the autograd nodes that hand their
        gradients to AccumulateGrad then belong to the current stream, so the engine makes it
        wait for the side stream before accumulating, and gradient-reduction hooks (which read
        every gradient of a bucket on one stream) never see a gradient still being written."""
        w1, w3, w2 = (lin.weight.view_as(lin.weight) for lin in (self.w1, self.w3, self.w2))
        return start_on_side_stream(lambda h: F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2), x)


class MoELayer(nn.Module):
    """A mixture-of-experts SwiGLU MLP. ``forward`` returns ``(out, losses)``."""

    def __init__(self, dim: int, ffn_dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.expert_ffn_dim = cfg.expert_ffn_dim or ffn_dim
        self.router = build_router(dim, cfg.num_experts, cfg.router)
        self.experts = GroupedExperts(cfg.num_experts, dim, self.expert_ffn_dim, cfg.grouped_gemm)
        self.shared_experts = (SwiGLU(dim, self.expert_ffn_dim * cfg.num_shared_experts)
                               if cfg.num_shared_experts > 0 else None)
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self.stats = ExpertLoadStats(cfg.num_experts)
        # 'dynamic'/'controller' capacity: per-layer state (controller factor, drop rate) and the
        # MAX reduction over the ep group that expert parallelism injects (None: one process).
        self.capacity_state = (CapacityState(cfg.capacity)
                               if cfg.capacity.policy in ("dynamic", "controller") else None)
        self.capacity_reduce_fn = None

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def capacity_for(self, num_tokens: int, top_k: int,
                     tokens_per_expert: torch.Tensor | None = None) -> int | None:
        """Per-expert capacity for this (local) batch, or None when dropless.

        ``tokens_per_expert`` (this batch's routed counts) is needed by policy 'dynamic'."""
        policy = self.cfg.capacity
        if policy.policy == "dropless":
            return None
        factor = policy.capacity_factor if self.training else policy.eval_capacity_factor
        if policy.policy == "fixed":
            return cap.expert_capacity(num_tokens, self.num_experts, top_k, factor)
        return capacity_dynamic.capacity_for(self, num_tokens, top_k, tokens_per_expert)

    @property
    def uses_token_importance(self) -> bool:
        """Whether the router wants the block attention's per-token importance (DA-MoE)."""
        return bool(getattr(self.router, "uses_token_importance", False))

    def route(self, x_TD: torch.Tensor, seq_len: int | None,
              importance_T: torch.Tensor | None = None) -> RoutingResult:
        extra = {} if importance_T is None else {"importance_T": importance_T}
        return self.limit_to_capacity(self.router(x_TD, seq_len=seq_len, **extra))

    def limit_to_capacity(self, routing: RoutingResult) -> RoutingResult:
        """Drop the assignments beyond this batch's per-expert capacity (none when dropless)."""
        capacity = self.capacity_for(routing.num_tokens, routing.top_k, routing.tokens_per_expert)
        if capacity is not None:
            priority = routing.weights if self.cfg.capacity.drop_policy == "score" else None
            kept = cap.apply_capacity(routing.indices, routing.valid, self.num_experts, capacity, priority)
            routing.valid = kept
            routing.weights = torch.where(kept, routing.weights, 0.0)
        return routing

    def forward(self, x_BSD: torch.Tensor, token_importance_BS: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, seq_len, dim = x_BSD.shape
        x_TD = x_BSD.reshape(-1, dim)
        overlap = self.shared_experts is not None and self.cfg.overlap_shared_experts
        # On CUDA the shared experts start first, on a side stream, and overlap everything below.
        side: SideWork | None = None
        if overlap and can_use_side_stream(x_TD):
            side = self.shared_experts.start_on_side_stream(x_TD)
        importance_T = None if token_importance_BS is None else token_importance_BS.reshape(-1)
        routing = self.route(x_TD, seq_len, importance_T)
        if self.training:
            self._record(routing)

        shared_TD = None
        if self.dispatches_in_chunks():
            # Off CUDA, the shared experts run while the first chunk's all-to-all is in flight.
            side_work = (lambda: self.shared_experts(x_TD)) if overlap and side is None else None
            out_TD, shared_TD = run_pipelined(self.dispatcher, x_TD, routing.indices, routing.valid,
                                              routing.weights, self.experts, self.cfg.dispatch_chunks,
                                              side_work)
        else:
            expert_in, tokens_per_expert, handle = self.dispatcher.dispatch(x_TD, routing.indices, routing.valid)
            expert_out = self.experts(expert_in, tokens_per_expert)
            out_TD = self.dispatcher.combine(expert_out, routing.weights, handle)
        if self.shared_experts is not None:
            if side is not None:
                shared_TD = side.join()
            elif shared_TD is None:
                shared_TD = self.shared_experts(x_TD)
            out_TD = out_TD + shared_TD
        return out_TD.view(batch, seq_len, dim), routing.losses

    def dispatches_in_chunks(self) -> bool:
        """Whether this forward exchanges its rows in ``moe.dispatch_chunks`` overlapped chunks:
        under expert parallelism (an all-to-all dispatcher with a group), in eager mode (the
        split-phase collectives are not traced by ``torch.compile``, which gets the plain path)."""
        return (self.cfg.dispatch_chunks > 1 and isinstance(self.dispatcher, AllToAllDispatcher)
                and self.dispatcher.ep_group is not None and not torch.compiler.is_compiling())

    @torch.no_grad()
    def _record(self, routing: RoutingResult) -> None:
        if routing.valid is None:
            kept = routing.tokens_per_expert
        else:
            experts = torch.where(routing.valid, routing.indices, self.num_experts)
            kept = count_per_expert(experts.flatten(), self.num_experts + 1)[:self.num_experts]
        self.stats.update(routing.tokens_per_expert, kept, routing.num_tokens)
