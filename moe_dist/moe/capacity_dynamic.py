"""Capacity policies whose limit changes with the data: 'dynamic' and 'controller'.

'dynamic' (Tutel's CF <= 0 modes, ALGORITHMS.md §9.6): the capacity of a step is what the
busiest expert needs, ``C = max over the EP group of max_e count_e`` (counts per source rank,
the unit every capacity here uses). With ``capacity_factor > 0`` it is bounded by Tutel's
``k * int(CF * ceil(T / E))``. Unbounded, nothing is dropped and every rank agrees on one C.
The reduction is injected: expert parallelism sets ``layer.capacity_reduce_fn`` (an all-reduce
MAX over the ep group, in place or returning the result); None means one process. C is read to
the host (it is an int for the capacity rule and the logs): one device-to-host sync per layer
forward on the GPU, the only one of a 'dynamic' layer on one GPU (docs/parallelism.md counts
them, ``tests/gpu/test_host_syncs_gpu.py`` proves the count).

'controller': a closed loop that moves the capacity factor to hold ``target_drop_rate`` below
the memory ceiling ``max_capacity_factor``. Each step's dropped and routed counts are summed
over every rank routing different tokens (the same ``reduce_fn`` as the loss-free bias), then

    r = dropped / routed
    e = clip((r - target) / max(target, 1e-3), -1, 1)
    log(cf) += controller_gain * e,   cf clipped to [MIN_CAPACITY_FACTOR, max_capacity_factor]

and ``C = ceil(cf * T * K / E)`` as for 'fixed'. The factor is a buffer changed only from
all-reduced counts, so it is identical on every rank and saved in checkpoints; the forward uses
its host copy, refreshed once per optimizer step, so a 'controller' layer does not sync. At
evaluation the controller uses ``eval_capacity_factor``.

Both policies keep per-step statistics in :class:`CapacityState` (one per layer) and expose
them through :func:`capacity_metrics` for logging.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_dist.config import CapacityConfig
from moe_dist.moe import capacity as cap
from moe_dist.moe.reduction import ReduceFn, reduce_with

MIN_CAPACITY_FACTOR = 0.1
"""Floor of the controller's factor (a factor near 0 would drop almost everything)."""


def tutel_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tutel's static capacity ``k * int(CF * ceil(T / E))`` (T=1000, E=8, k=2, CF=1.25 -> 312)."""
    return top_k * int(capacity_factor * math.ceil(num_tokens / num_experts))


def dropped_assignments(tokens_per_expert_E: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assignments beyond ``capacity`` summed over experts (what a capacity limit drops)."""
    return (tokens_per_expert_E - capacity).clamp_min(0).sum()


def dynamic_capacity(tokens_per_expert_E: torch.Tensor, bound: int | None,
                     reduce_max_fn: ReduceFn | None = None) -> int:
    """``min(max over ranks of max_e count_e, bound)`` as a host int (at least 1)."""
    busiest = tokens_per_expert_E.max().reshape(1).clone() if tokens_per_expert_E.numel() else \
        tokens_per_expert_E.new_zeros(1)
    busiest = reduce_with(busiest, reduce_max_fn)
    needed = max(int(busiest.item()), 1)  # NOTE: device-to-host sync (sizes this step's buffers)
    return needed if bound is None else min(needed, bound)


class CapacityState(nn.Module):
    """Per-layer state of the 'dynamic' and 'controller' policies.

    ``capacity_factor`` (controller) and ``drop_rate`` (last all-reduced step) are persistent
    buffers; ``step_routed`` / ``step_dropped`` accumulate this rank's counts over the current
    optimizer step; ``last_capacity`` is the host value used by the last forward.
    """

    def __init__(self, cfg: CapacityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        start = cfg.capacity_factor if cfg.policy == "controller" else 0.0
        self.register_buffer("capacity_factor", torch.tensor(float(start)))
        self.register_buffer("drop_rate", torch.zeros(()))
        self.register_buffer("step_routed", torch.zeros(()), persistent=False)
        self.register_buffer("step_dropped", torch.zeros(()), persistent=False)
        self.last_capacity: int | None = None
        self._factor_host: float | None = float(start)
        self.register_load_state_dict_post_hook(CapacityState._forget_host_factor)

    @staticmethod
    def _forget_host_factor(module: nn.Module, _incompatible) -> None:
        module._factor_host = None

    @property
    def factor(self) -> float:
        """The controller's current factor on the host (refreshed once per step)."""
        if self._factor_host is None:
            self._factor_host = float(self.capacity_factor)  # NOTE: device-to-host sync (after a load)
        return self._factor_host

    @torch.no_grad()
    def record(self, tokens_per_expert_E: torch.Tensor, capacity: int) -> None:
        self.step_routed += tokens_per_expert_E.sum().to(self.step_routed.dtype)
        self.step_dropped += dropped_assignments(tokens_per_expert_E, capacity).to(self.step_dropped.dtype)

    @torch.no_grad()
    def apply_step(self, routed: torch.Tensor, dropped: torch.Tensor) -> None:
        """End of an optimizer step, with the step's counts summed over the token ranks."""
        has_tokens = routed > 0
        rate = torch.where(has_tokens, dropped / routed.clamp_min(1.0), self.drop_rate)
        self.drop_rate.copy_(rate)
        if self.cfg.policy == "controller":
            target = self.cfg.target_drop_rate
            error = ((rate - target) / max(target, 1e-3)).clamp(-1.0, 1.0)
            new = (self.capacity_factor.log() + self.cfg.controller_gain * error).exp()
            new = new.clamp(MIN_CAPACITY_FACTOR, self.cfg.max_capacity_factor)
            self.capacity_factor.copy_(torch.where(has_tokens, new, self.capacity_factor))
            self._factor_host = float(self.capacity_factor)  # NOTE: device-to-host sync (once per step)
        self.step_routed.zero_()
        self.step_dropped.zero_()


def capacity_for(layer: nn.Module, num_tokens: int, top_k: int,
                 tokens_per_expert: torch.Tensor | None = None) -> int:
    """Capacity of this forward for ``layer`` (an MoELayer with policy 'dynamic'/'controller').

    ``tokens_per_expert`` [E] are this rank's routed counts; 'dynamic' needs them, and both
    policies use them to count drops for the controller and the logs.
    """
    policy = layer.cfg.capacity
    state: CapacityState = layer.capacity_state
    if policy.policy == "dynamic":
        if tokens_per_expert is None:
            raise ValueError("moe.capacity.policy='dynamic' sizes the capacity from the routed counts; "
                             "call MoELayer.capacity_for(num_tokens, top_k, tokens_per_expert)")
        bound = (tutel_capacity(num_tokens, layer.num_experts, top_k, policy.capacity_factor)
                 if policy.capacity_factor > 0 else None)
        capacity = dynamic_capacity(tokens_per_expert, bound, getattr(layer, "capacity_reduce_fn", None))
    elif policy.policy == "controller":
        factor = state.factor if layer.training else policy.eval_capacity_factor
        capacity = cap.expert_capacity(num_tokens, layer.num_experts, top_k, factor)
    else:
        raise ValueError(f"capacity_dynamic handles moe.capacity.policy 'dynamic' and 'controller', "
                         f"not {policy.policy!r}")
    state.last_capacity = capacity
    if layer.training and tokens_per_expert is not None:
        state.record(tokens_per_expert, capacity)
    return capacity


def capacity_states(model: nn.Module) -> list[CapacityState]:
    return [m for m in model.modules() if isinstance(m, CapacityState)]


@torch.no_grad()
def update_capacity_states(model: nn.Module, reduce_fn: ReduceFn | None = None) -> None:
    """After an optimizer step: drop rates (and controller factors) from the step's counts,
    summed by ``reduce_fn`` over every rank routing different tokens, in one reduction."""
    states = capacity_states(model)
    if not states:
        return
    counts = torch.stack([torch.stack([s.step_routed, s.step_dropped]) for s in states])  # [L, 2]
    counts = reduce_with(counts, reduce_fn)
    for state, (routed, dropped) in zip(states, counts):
        state.apply_step(routed, dropped)


def capacity_metrics(state: CapacityState, prefix: str) -> dict[str, float]:
    """Scalars to log for one layer: ``<prefix>/capacity_factor`` (controller),
    ``<prefix>/capacity`` (last forward) and ``<prefix>/capacity_drop_rate`` (last step)."""
    # NOTE: device-to-host sync (logging steps only)
    out = {f"{prefix}/capacity_drop_rate": float(state.drop_rate)}
    if state.cfg.policy == "controller":
        out[f"{prefix}/capacity_factor"] = state.factor
    if state.last_capacity is not None:
        out[f"{prefix}/capacity"] = float(state.last_capacity)
    return out
