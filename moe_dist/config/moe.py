"""The ``moe`` section: experts, router, capacity policy and DynMoE adaptation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe_dist.config.errors import require


@dataclass(kw_only=True)
class AdaptiveConfig:
    """DynMoE adaptive expert count (router type 'top_any' only): ``moe.num_experts`` is the
    pool of pre-allocated slots; experts are switched on and off inside it."""

    enabled: bool = False
    """Grow and prune experts during training. False keeps the active set fixed."""
    initial_experts: int = 0
    """Active slots at step 0 (the first ones). 0 means every slot of moe.num_experts."""
    max_experts: int = 0
    """Most slots active at once. 0 means moe.num_experts (the whole pool)."""
    update_every: int = 900
    """Optimizer steps between two add/remove decisions (DynMoE: 900)."""
    record_steps: int = 300
    """Routing is recorded during the last record_steps steps before each decision (DynMoE:
    300). 0 records the whole window."""
    prune_after: int = 1
    """An active expert is removed after this many consecutive decision windows without a
    single token (DynMoE: 1). 0 never removes."""

    def __post_init__(self) -> None:
        for name in ("initial_experts", "max_experts", "record_steps", "prune_after"):
            value = getattr(self, name)
            require(value >= 0, f"moe.router.adaptive.{name} ({value}) must be >= 0")
        require(self.update_every >= 1,
                 f"moe.router.adaptive.update_every ({self.update_every}) must be >= 1")
        require(self.record_steps <= self.update_every,
                 f"moe.router.adaptive.record_steps ({self.record_steps}) cannot exceed "
                 f"update_every ({self.update_every}); use record_steps <= {self.update_every}")
        require(self.max_experts == 0 or self.initial_experts <= self.max_experts,
                 f"moe.router.adaptive.initial_experts ({self.initial_experts}) cannot exceed "
                 f"max_experts ({self.max_experts})")


@dataclass(kw_only=True)
class RouterConfig:
    type: Literal["softmax_topk", "sigmoid_topk", "expert_choice", "top_p", "xmoe", "da_moe",
                  "top_any"] = "softmax_topk"
    """Gate family. 'softmax_topk' is GShard/Switch/Mixtral; see docs/routing.md for the rest."""
    top_k: int = 2
    """Experts per token for fixed-k routers (the maximum for variable-k ones)."""
    normalize_weights: bool = True
    """Renormalise the selected gate values to sum to one per token. Never applied with one
    expert per token (top_k=1): the single weight would be exactly 1 and the router would get no
    gradient from the task loss (Megatron-core does the same)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss E * sum_i f_i P_i (form: aux_loss_type). 0 disables it."""
    aux_loss_type: Literal["assignments", "top1"] = "assignments"
    """What f_i of aux_loss counts: 'assignments' is expert i's share of all T*top_k routed
    assignments (Mixtral, Megatron-core); 'top1' is the share of tokens whose first choice is
    expert i (Switch Transformer, GShard). The same for top_k=1. Top-k routers only."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the DeepSeek-V3 sequence-level balancing loss. 0 disables it."""
    z_loss_coef: float = 0.001
    """Weight of the ST-MoE router z-loss. 0 disables it."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing: per-step rate u of the sign update of the selection
    bias (DeepSeek uses 1e-3). 0 disables it."""
    top_p: float = 0.4
    """Cumulative-probability threshold of the 'top_p' router."""
    xmoe_threshold: float = 0.9
    """Threshold of the 'xmoe' router."""
    expert_choice_capacity: float = 2.0
    """Capacity factor c of 'expert_choice': each expert takes n*c/E tokens."""
    top_any_tau: float = 1.0
    """Temperature of DynMoE top-any gating."""
    top_any_reg_coef: float = 0.01
    """Weight of DynMoE's diversity, simplicity and efficiency regularisers."""
    top_any_max_k: int = 0
    """Most experts one token may activate under 'top_any' (those with the largest margins are
    kept). 0 means no cap, as in DynMoE. 'top_any' does not read top_k."""
    top_any_train_fallback: bool = False
    """'top_any' in training: a token that activates no expert goes to its closest active expert
    (weight 1, no gradient into the gate) instead of getting a zero MoE output (DynMoE). Such
    fallback routings are never counted as routings for expert pruning. At evaluation the
    fallback always applies, as in DynMoE."""
    jitter: float = 0.0
    """Multiplicative input jitter during training (Switch). 0 disables it."""
    entropy_loss_coef: float = 0.0
    """Weight of the mean per-token router entropy (Huang et al.'s dynamic loss, 1e-4 with
    'top_p'); pushes variable-k routers toward fewer experts. 0 disables it."""
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    """DynMoE expert growth and pruning (router type 'top_any')."""

    def __post_init__(self) -> None:
        require(self.top_k >= 1, f"moe.router.top_k ({self.top_k}) must be >= 1")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate", "jitter",
                     "top_any_reg_coef", "entropy_loss_coef"):
            value = getattr(self, name)
            require(value >= 0, f"moe.router.{name} ({value}) must be >= 0 (0 disables it)")
        require(0 < self.top_p <= 1, f"moe.router.top_p ({self.top_p}) must be in (0, 1]")
        require(0 < self.xmoe_threshold <= 1,
                 f"moe.router.xmoe_threshold ({self.xmoe_threshold}) must be in (0, 1]")
        require(self.expert_choice_capacity > 0,
                 f"moe.router.expert_choice_capacity ({self.expert_choice_capacity}) must be > 0 "
                 "(each expert takes n*c/E tokens; the paper uses 2)")
        require(self.top_any_tau > 0, f"moe.router.top_any_tau ({self.top_any_tau}) must be > 0")
        require(self.top_any_max_k >= 0, f"moe.router.top_any_max_k ({self.top_any_max_k}) must be >= 0 "
                                         "(0 = no cap)")
        if self.bias_update_rate > 0:
            require(self.type not in ("expert_choice", "top_any"),
                     f"moe.router.bias_update_rate ({self.bias_update_rate}) has no meaning for router "
                     f"type '{self.type}' (it balances by construction / by its thresholds); set it to 0")
        if self.aux_loss_type == "top1":
            require(self.type in ("softmax_topk", "sigmoid_topk"),
                     f"moe.router.aux_loss_type='top1' counts each token's first choice, which only the top-k "
                     f"routers have; router type '{self.type}' uses its valid assignments: set aux_loss_type="
                     "'assignments'")
        if self.adaptive.enabled:
            require(self.type == "top_any",
                     f"moe.router.adaptive.enabled needs moe.router.type='top_any', got '{self.type}'")


@dataclass(kw_only=True)
class CapacityConfig:
    policy: Literal["dropless", "fixed", "dynamic", "controller"] = "dropless"
    """'dropless' sends every token; 'fixed' bounds each expert at capacity_factor * k * T / E
    tokens per source rank; 'dynamic' sizes buffers by the busiest expert (bounded by
    capacity_factor when > 0); 'controller' adapts the factor to hold target_drop_rate."""
    capacity_factor: float = 1.25
    """Capacity factor for 'fixed' (and the bound of 'dynamic'; 0 = unbounded)."""
    drop_policy: Literal["score", "position"] = "position"
    """Which tokens lose when an expert is full: the lowest gate score, or the latest position
    (first choices always before second choices)."""
    target_drop_rate: float = 0.01
    """Drop rate the 'controller' policy steers to."""
    max_capacity_factor: float = 4.0
    """Memory ceiling of the 'controller' policy."""
    eval_capacity_factor: float = 2.0
    """Capacity factor at evaluation for 'fixed' and 'controller'."""
    controller_gain: float = 0.05
    """'controller': change of log(capacity_factor) per step at a relative drop-rate error of
    1 (the error is clipped to [-1, 1])."""

    def __post_init__(self) -> None:
        require(self.capacity_factor >= 0,
                 f"moe.capacity.capacity_factor ({self.capacity_factor}) must be >= 0")
        require(0 <= self.target_drop_rate < 1,
                 f"moe.capacity.target_drop_rate ({self.target_drop_rate}) must be in [0, 1)")
        require(self.controller_gain > 0,
                 f"moe.capacity.controller_gain ({self.controller_gain}) must be > 0")
        if self.policy == "controller":
            require(0 < self.capacity_factor <= self.max_capacity_factor,
                     f"moe.capacity.capacity_factor ({self.capacity_factor}) is the controller's starting "
                     f"factor and must be in (0, max_capacity_factor={self.max_capacity_factor}]")
        if self.policy == "fixed":
            require(self.capacity_factor > 0,
                     "moe.capacity.capacity_factor must be > 0 with policy 'fixed'; "
                     "use policy=dropless for no limit")


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    """Routed experts per MoE layer (global, across the EP group). 0 makes the model dense."""
    every: int = 1
    """Every `every`-th block (1-based: blocks every-1, 2*every-1, ...) has an MoE MLP; 0 = dense."""
    expert_ffn_dim: int = 0
    """Hidden size of one expert's SwiGLU. 0 means model.ffn_dim."""
    num_shared_experts: int = 0
    """Always-active shared experts (DeepSeek style), evaluated as one dense SwiGLU."""
    grouped_gemm: Literal["auto", "grouped_mm", "loop", "triton_fused"] = "auto"
    """Expert GEMM backend. 'auto' uses torch._grouped_mm when shapes allow, else the loop.
    'triton_fused' (CUDA only) computes SwiGLU experts with Triton grouped GEMMs that hold the
    activation in their epilogues (forward, and the backward's input gradient of the second
    GEMM); other experts, dtypes or widths behave as 'auto'."""
    dispatch_chunks: int = 1
    """Expert parallelism: split each MoE layer's all-to-all dispatch into this many chunks, so
    that the exchange of chunk i+1 and the return of chunk i-1 overlap the experts of chunk i
    (a contiguous 1/n of every expert's rows per chunk; the same drops as unchunked). Needs
    parallel.ep > 1, parallel.etp = 1 and model.arch=transformer. 1 disables it."""
    overlap_shared_experts: bool = True
    """Compute the shared experts concurrently with the routed ones: on CUDA (eager) on a side
    stream; on other devices, with dispatch_chunks > 1, while the first dispatch all-to-all is in
    flight. The same math either way. False computes them after the routed experts."""
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)

    def __post_init__(self) -> None:
        require(self.num_experts >= 0, f"moe.num_experts ({self.num_experts}) must be >= 0")
        require(self.every >= 0, f"moe.every ({self.every}) must be >= 0 (0 = dense model)")
        require(self.num_shared_experts >= 0,
                 f"moe.num_shared_experts ({self.num_shared_experts}) must be >= 0")
        require(self.dispatch_chunks >= 1,
                 f"moe.dispatch_chunks ({self.dispatch_chunks}) must be >= 1 (1 disables chunking)")
        if self.enabled:
            adaptive = self.router.adaptive
            for name in ("initial_experts", "max_experts"):
                require(getattr(adaptive, name) <= self.num_experts,
                         f"moe.router.adaptive.{name} ({getattr(adaptive, name)}) cannot exceed the slot "
                         f"pool moe.num_experts ({self.num_experts}); raise num_experts or lower {name}")
            require(self.router.top_any_max_k <= self.num_experts,
                     f"moe.router.top_any_max_k ({self.router.top_any_max_k}) cannot exceed moe.num_experts "
                     f"({self.num_experts}); use 0 for no cap")
            require(self.router.top_k <= self.num_experts,
                     f"moe.router.top_k ({self.router.top_k}) cannot exceed moe.num_experts "
                     f"({self.num_experts}); use top_k <= {self.num_experts} or more experts")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0 and self.every > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.enabled and (layer_idx + 1) % self.every == 0
