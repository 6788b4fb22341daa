"""Typed configuration: dataclass sections, YAML loading, dotted overrides, validation.

A config is one tree, ``Config(model, moe, parallel, data, train, checkpoint, log, zero)``.
Every field documents its meaning and its "disabled" value. Values come from, in increasing
precedence: the dataclass defaults, a YAML file, and ``section.key=value`` overrides from the
command line. Unknown keys and wrong types are errors that name the key and suggest a fix.

Per-section checks live in ``__post_init__``; checks that span sections or need the world
size live in :func:`validate`, which every rank runs before any process group is created.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A user-facing configuration problem: names the field, the value and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True)
class SwitchHeadConfig:
    """SwitchHead attention (model.arch=switchhead): value/output projections are per-head
    mixtures of experts picked by a sigmoid gate (ALGORITHMS.md section 1)."""

    n_heads: int = 2
    """Attention matrices H (SwitchHead uses few). 0 means model.n_heads."""
    head_dim: int = 0
    """Width d_h of one head. 0 means model.dim // n_heads."""
    num_experts: int = 4
    """Value and output experts per head (E)."""
    top_k: int = 2
    """Experts selected per head and token, on each side (k)."""
    switch_all: bool = False
    """SwitchAll: every MLP is also a sigma-MoE (sigmoid gate, no renormalisation, entropy
    regulariser) built from the moe section (num_experts, expert_ffn_dim, router.top_k)."""
    entropy_reg: float = 0.001
    """Weight gamma of the sigma-MoE entropy regulariser (SwitchAll only). 0 disables it."""

    def __post_init__(self) -> None:
        _require(self.n_heads >= 0 and self.head_dim >= 0,
                 f"model.switchhead.n_heads ({self.n_heads}) and head_dim ({self.head_dim}) must be >= 0 "
                 "(0 = derive from model)")
        _require(self.num_experts >= 1, f"model.switchhead.num_experts ({self.num_experts}) must be >= 1")
        _require(1 <= self.top_k <= self.num_experts,
                 f"model.switchhead.top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        _require(self.head_dim % 2 == 0, f"model.switchhead.head_dim ({self.head_dim}) must be even (rotary)")
        _require(self.entropy_reg >= 0, f"model.switchhead.entropy_reg ({self.entropy_reg}) must be >= 0")


@dataclass(kw_only=True)
class PEERConfig:
    """PEER (model.arch=peer): a pool of single-neuron experts retrieved by product keys
    (ALGORITHMS.md section 3). PEER layers replace the MLPs of the blocks moe.every selects."""

    num_experts: int = 1024 * 1024
    """Pool size N; must be a perfect square n*n (two sub-key tables of n keys)."""
    heads: int = 8
    """Retrieval heads h (each retrieves top_k experts; outputs are summed)."""
    top_k: int = 16
    """Experts per head k; at most sqrt(num_experts)."""
    query_dim: int = 128
    """Query width d_k (split into two halves of d_k/2); must be even. 0 means model.dim."""
    query_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    """Normalisation of the query: BatchNorm over the batch (paper; per-rank statistics under
    data parallelism), LayerNorm per token, or none."""
    activation: Literal["gelu", "relu"] = "gelu"
    """Activation phi of the single-neuron experts."""

    def __post_init__(self) -> None:
        side = math.isqrt(max(self.num_experts, 0))
        _require(self.num_experts > 0 and side * side == self.num_experts,
                 f"model.peer.num_experts ({self.num_experts}) must be a perfect square n*n; "
                 f"use {side * side} or {(side + 1) ** 2}")
        _require(self.heads >= 1, f"model.peer.heads ({self.heads}) must be >= 1")
        _require(1 <= self.top_k <= side,
                 f"model.peer.top_k ({self.top_k}) must be in [1, sqrt(num_experts)={side}]; lower top_k "
                 "or raise num_experts")
        _require(self.query_dim >= 0 and self.query_dim % 2 == 0,
                 f"model.peer.query_dim ({self.query_dim}) must be even and >= 0 (0 = model.dim)")


@dataclass(kw_only=True)
class MHMoEConfig:
    """Multi-head MoE (model.arch=mh_moe): tokens split into sub-tokens that are routed
    separately, then merged (ALGORITHMS.md section 4)."""

    heads: int = 2
    """Sub-tokens per token h; model.dim must be divisible by it."""
    match_moe: bool = True
    """Choose the sub-token experts' count and hidden size so that parameters and FLOPs match
    the plain MoE of the moe section (ALGORITHMS.md section 4(c)); false uses moe.num_experts
    and moe.expert_ffn_dim on the sub-tokens as given."""
    num_experts: int = 0
    """Sub-token experts E'. 0 derives it (match_moe) or takes moe.num_experts; set it to make
    E' divisible by parallel.ep."""
    expert_ffn_dim: int = 0
    """Hidden size D' of one sub-token expert. 0 derives it (match_moe) or takes
    moe.expert_ffn_dim."""

    def __post_init__(self) -> None:
        _require(self.heads >= 1, f"model.mh_moe.heads ({self.heads}) must be >= 1")
        _require(self.num_experts >= 0 and self.expert_ffn_dim >= 0,
                 f"model.mh_moe.num_experts ({self.num_experts}) and expert_ffn_dim "
                 f"({self.expert_ffn_dim}) must be >= 0 (0 = derive)")


@dataclass(kw_only=True)
class StratifiedConfig:
    """Stratified MoE (model.arch=stratified): experts in strata; a token's top-1 choice decides
    whether it takes another pass through a higher stratum (ALGORITHMS.md section 5)."""

    strata: list[int] = field(default_factory=lambda: [4, 4])
    """Experts per stratum, lowest first; must sum to moe.num_experts."""
    stratum_norm: bool = True
    """RMSNorm of the input of every pass (one norm per stratum), as the reference's
    --hmoe-layernorm; false feeds later passes the raw residual stream."""

    def __post_init__(self) -> None:
        _require(len(self.strata) >= 1 and all(n >= 1 for n in self.strata),
                 f"model.stratified.strata ({self.strata}) must be a non-empty list of positive sizes")


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["transformer", "switchhead", "peer", "mh_moe", "stratified"] = "transformer"
    """Model family. 'transformer' is the decoder-only LM with (optionally) MoE MLPs; the
    others swap in a seed architecture (see docs/architectures.md)."""
    vocab_size: int = 0
    """Vocabulary size. 0 takes it from the tokenizer (256 for bytes)."""
    dim: int = 128
    """Hidden size of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; dim must be divisible by it."""
    ffn_dim: int = 0
    """Hidden size of dense SwiGLU MLPs. 0 means 8/3 * dim rounded up to a multiple of 16."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables are built for; data.seq_len may not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections are scaled by depth)."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    switchhead: SwitchHeadConfig = field(default_factory=SwitchHeadConfig)
    """Options of model.arch=switchhead."""
    peer: PEERConfig = field(default_factory=PEERConfig)
    """Options of model.arch=peer."""
    mh_moe: MHMoEConfig = field(default_factory=MHMoEConfig)
    """Options of model.arch=mh_moe."""
    stratified: StratifiedConfig = field(default_factory=StratifiedConfig)
    """Options of model.arch=stratified."""

    def __post_init__(self) -> None:
        _require(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0,
                 f"model.dim ({self.dim}), model.n_layers ({self.n_layers}) and model.n_heads "
                 f"({self.n_heads}) must be positive")
        _require(self.dim % self.n_heads == 0,
                 f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}); "
                 f"try n_heads in {_divisors(self.dim, limit=64)}")
        _require((self.dim // self.n_heads) % 2 == 0,
                 f"head size model.dim/model.n_heads ({self.dim // self.n_heads}) must be even "
                 "for rotary embeddings")
        _require(self.vocab_size >= 0, f"model.vocab_size ({self.vocab_size}) must be >= 0 (0 = from tokenizer)")
        _require(self.max_seq_len > 0, f"model.max_seq_len ({self.max_seq_len}) must be positive")
        if self.ffn_dim == 0:
            self.ffn_dim = _round_up(int(8 * self.dim / 3), 16)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


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
            _require(value >= 0, f"moe.router.adaptive.{name} ({value}) must be >= 0")
        _require(self.update_every >= 1,
                 f"moe.router.adaptive.update_every ({self.update_every}) must be >= 1")
        _require(self.record_steps <= self.update_every,
                 f"moe.router.adaptive.record_steps ({self.record_steps}) cannot exceed "
                 f"update_every ({self.update_every}); use record_steps <= {self.update_every}")
        _require(self.max_experts == 0 or self.initial_experts <= self.max_experts,
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
    """Renormalise the selected gate values to sum to one per token."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss. 0 disables it."""
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
    """Weight of DynMoE's diversity + simplicity regularisers."""
    jitter: float = 0.0
    """Multiplicative input jitter during training (Switch). 0 disables it."""
    entropy_loss_coef: float = 0.0
    """Weight of the mean per-token router entropy (Huang et al.'s dynamic loss, 1e-4 with
    'top_p'); pushes variable-k routers toward fewer experts. 0 disables it."""
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    """DynMoE expert growth and pruning (router type 'top_any')."""

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, f"moe.router.top_k ({self.top_k}) must be >= 1")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate", "jitter",
                     "top_any_reg_coef", "entropy_loss_coef"):
            value = getattr(self, name)
            _require(value >= 0, f"moe.router.{name} ({value}) must be >= 0 (0 disables it)")
        _require(0 < self.top_p <= 1, f"moe.router.top_p ({self.top_p}) must be in (0, 1]")
        _require(0 < self.xmoe_threshold <= 1,
                 f"moe.router.xmoe_threshold ({self.xmoe_threshold}) must be in (0, 1]")
        _require(self.expert_choice_capacity > 0,
                 f"moe.router.expert_choice_capacity ({self.expert_choice_capacity}) must be > 0 "
                 "(each expert takes n*c/E tokens; the paper uses 2)")
        _require(self.top_any_tau > 0, f"moe.router.top_any_tau ({self.top_any_tau}) must be > 0")
        if self.bias_update_rate > 0:
            _require(self.type not in ("expert_choice", "top_any"),
                     f"moe.router.bias_update_rate ({self.bias_update_rate}) has no meaning for router "
                     f"type '{self.type}' (it balances by construction / by its thresholds); set it to 0")
        if self.adaptive.enabled:
            _require(self.type == "top_any",
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
        _require(self.capacity_factor >= 0,
                 f"moe.capacity.capacity_factor ({self.capacity_factor}) must be >= 0")
        _require(0 <= self.target_drop_rate < 1,
                 f"moe.capacity.target_drop_rate ({self.target_drop_rate}) must be in [0, 1)")
        _require(self.controller_gain > 0,
                 f"moe.capacity.controller_gain ({self.controller_gain}) must be > 0")
        if self.policy == "controller":
            _require(0 < self.capacity_factor <= self.max_capacity_factor,
                     f"moe.capacity.capacity_factor ({self.capacity_factor}) is the controller's starting "
                     f"factor and must be in (0, max_capacity_factor={self.max_capacity_factor}]")
        if self.policy == "fixed":
            _require(self.capacity_factor > 0,
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
    grouped_gemm: Literal["auto", "grouped_mm", "loop"] = "auto"
    """Expert GEMM backend. 'auto' uses torch._grouped_mm when shapes allow, else the loop."""
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)

    def __post_init__(self) -> None:
        _require(self.num_experts >= 0, f"moe.num_experts ({self.num_experts}) must be >= 0")
        _require(self.every >= 0, f"moe.every ({self.every}) must be >= 0 (0 = dense model)")
        _require(self.num_shared_experts >= 0,
                 f"moe.num_shared_experts ({self.num_shared_experts}) must be >= 0")
        if self.enabled:
            adaptive = self.router.adaptive
            for name in ("initial_experts", "max_experts"):
                _require(getattr(adaptive, name) <= self.num_experts,
                         f"moe.router.adaptive.{name} ({getattr(adaptive, name)}) cannot exceed the slot "
                         f"pool moe.num_experts ({self.num_experts}); raise num_experts or lower {name}")
            _require(self.router.top_k <= self.num_experts,
                     f"moe.router.top_k ({self.router.top_k}) cannot exceed moe.num_experts "
                     f"({self.num_experts}); use top_k <= {self.num_experts} or more experts")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0 and self.every > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.enabled and (layer_idx + 1) % self.every == 0


@dataclass(kw_only=True)
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree. -1 infers world_size / tp."""
    tp: int = 1
    """Tensor-parallel degree for attention, dense MLPs, embeddings and head. 1 disables it."""
    ep: int = 1
    """Expert-parallel degree: experts are sharded over groups of `ep` ranks. 1 disables it."""
    etp: int = 1
    """Expert tensor parallelism (each expert split over `etp` ranks). 1 disables it."""
    sequence_parallel: bool = True
    """With tp > 1, each TP rank routes its own slice of the sequence."""
    collective_timeout_s: float = 300.0
    """A collective that does not finish in this many seconds aborts every rank."""

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "etp"):
            value = getattr(self, name)
            _require(value >= 1, f"parallel.{name} ({value}) must be >= 1 (1 disables it)")
        _require(self.dp == -1 or self.dp >= 1, f"parallel.dp ({self.dp}) must be >= 1, or -1 to infer it")
        _require(self.collective_timeout_s > 0,
                 f"parallel.collective_timeout_s ({self.collective_timeout_s}) must be positive")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "default"
    """'default' (the bundled Shakespeare corpus), a local path (.txt, .jsonl, .json, .parquet,
    a directory of them, or a dataset saved with save_to_disk), or 'hf:<hub name>'."""
    text_field: str = "text"
    """Column holding the text in JSONL/Parquet/hub datasets."""
    tokenizer: Literal["byte", "bpe"] = "byte"
    """'byte' maps UTF-8 bytes to ids 0..255; 'bpe' trains a byte-level BPE locally."""
    bpe_vocab_size: int = 4096
    """Vocabulary of the locally trained BPE."""
    seq_len: int = 128
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Share of packed sequences held out for validation."""
    max_documents: int = 0
    """Use at most this many documents (0 = all), to keep CPU runs short."""
    seed: int = 1234
    """Seed of the shuffling order; the order is a pure function of (seed, epoch)."""
    cache_dir: str = ""
    """Where tokenised datasets are cached. '' means ~/.cache/moe_dist."""

    def __post_init__(self) -> None:
        _require(self.seq_len > 0, f"data.seq_len ({self.seq_len}) must be positive")
        _require(0 < self.val_fraction < 1, f"data.val_fraction ({self.val_fraction}) must be in (0, 1)")
        _require(self.bpe_vocab_size >= 260,
                 f"data.bpe_vocab_size ({self.bpe_vocab_size}) must be >= 260 (bytes plus merges)")
        _require(self.max_documents >= 0, f"data.max_documents ({self.max_documents}) must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, the same for any number of ranks."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass; accumulation = global / (micro * dp)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay as a fraction of lr."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and router biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value. 0 disables clipping."""
    seed: int = 0
    """Seed of parameter init and any training randomness."""
    eval_every: int = 50
    """Compute validation loss every this many steps (and at the end). 0 disables it."""
    eval_batches: int = 4
    """Micro-batches per validation pass."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype of autocast: 'auto' is bf16 on GPU and fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train. 'auto' picks CUDA when available."""
    engine: Literal["native", "deepspeed"] = "native"
    """'native' is moe_dist's own loop; 'deepspeed' wraps the model in a DeepSpeed engine."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, f"train.steps ({self.steps}) must be positive")
        _require(self.global_batch_size > 0 and self.micro_batch_size > 0,
                 f"train.global_batch_size ({self.global_batch_size}) and train.micro_batch_size "
                 f"({self.micro_batch_size}) must be positive")
        _require(self.lr > 0, f"train.lr ({self.lr}) must be positive")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"train.warmup_steps ({self.warmup_steps}) must be >= 0")
        _require(self.grad_clip >= 0, f"train.grad_clip ({self.grad_clip}) must be >= 0 (0 disables it)")
        _require(self.eval_every >= 0, f"train.eval_every ({self.eval_every}) must be >= 0")
        _require(self.eval_batches > 0, f"train.eval_batches ({self.eval_batches}) must be positive")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (and at the end). 0 saves only at the end."""
    keep_last: int = 2
    """Keep the newest K checkpoints; older ones are deleted after a verified save."""
    resume: str = "auto"
    """'auto' continues from the newest checkpoint in the run directory if one exists, 'none'
    starts fresh, any other value is a checkpoint directory to load."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"checkpoint.every ({self.every}) must be >= 0")
        _require(self.keep_last >= 1, f"checkpoint.keep_last ({self.keep_last}) must be >= 1")


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10
    """Write metrics every this many steps (device-side accumulation in between)."""
    tensorboard: bool = True
    """Write TensorBoard event files into <run_dir>/tb."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU. 0 looks it up for known GPUs; unknown means no MFU."""

    def __post_init__(self) -> None:
        _require(self.every > 0, f"log.every ({self.every}) must be positive")


@dataclass(kw_only=True)
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage (0, 1, 2 or 3) when train.engine=deepspeed."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU (ZeRO-Offload)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    bucket_size: int = 50_000_000
    """Reduce/allgather bucket size in elements."""
    ds_config: str = ""
    """Path of a DeepSpeed JSON config with extra keys (e.g. "wall_clock_breakdown") merged into
    the generated one. Keys moe_dist generates (batch sizes, clipping, precision,
    zero_optimization, optimizer, scheduler) are refused, not overridden. '' means none."""

    def __post_init__(self) -> None:
        _require(self.stage in (0, 1, 2, 3), f"zero.stage ({self.stage}) must be 0, 1, 2 or 3")
        _require(self.bucket_size > 0, f"zero.bucket_size ({self.bucket_size}) must be positive (elements)")
        _require(not (self.offload_optimizer and self.stage == 0),
                 "zero.offload_optimizer needs zero.stage >= 1 (stage 0 keeps no partitioned optimizer "
                 "state to offload); set zero.stage=1 or 2")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def __post_init__(self) -> None:
        _require(self.data.seq_len <= self.model.max_seq_len,
                 f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                 f"({self.model.max_seq_len}); lower seq_len or raise max_seq_len")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < ``section.key=value`` overrides, type-checked and validated."""
    raw: dict[str, Any] = {}
    if path is None:
        path = DEFAULT_CONFIG
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; shipped configs: "
                          f"{sorted(p.name for p in CONFIG_DIR.glob('*.yaml'))}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    raw = loaded or {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(Config, raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return from_dict(Config, raw)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. moe.num_experts=16")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            suggestion = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{suggestion[0]}'?" if suggestion else \
                f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors are bugs
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, prefix=f"{name}.")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{name} = {value!r} is not one of {list(choices)}{hint_text}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name} = {value!r} has the wrong type")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r} must be a list")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(item_hint, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} = {value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "3e-4" (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{name} = {value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r} must be a string")
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# Cross-section validation (needs the world size)
# --------------------------------------------------------------------------------------------

def resolve_dp(parallel: ParallelConfig, world_size: int) -> int:
    if parallel.dp != -1:
        return parallel.dp
    return max(world_size // parallel.tp, 1)


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need the world size. Runs on every rank before any collective."""
    par = cfg.parallel
    dp = resolve_dp(par, world_size)
    _require(dp * par.tp == world_size,
             f"parallel.dp ({dp}) x parallel.tp ({par.tp}) = {dp * par.tp} must equal the world size "
             f"({world_size}); use tp in {_divisors(world_size)} and dp=-1 to infer dp")
    _require(world_size % (par.ep * par.etp) == 0,
             f"parallel.ep ({par.ep}) x parallel.etp ({par.etp}) = {par.ep * par.etp} must divide the "
             f"world size ({world_size}); use ep in {_divisors(world_size)}")
    if cfg.moe.enabled:
        _require(cfg.moe.num_experts % par.ep == 0,
                 f"moe.num_experts ({cfg.moe.num_experts}) must be divisible by parallel.ep ({par.ep}); "
                 f"use ep in {[d for d in _divisors(cfg.moe.num_experts) if world_size % d == 0]} "
                 f"or num_experts={_round_up(cfg.moe.num_experts, par.ep)}")
    elif par.ep > 1:
        raise ConfigError(f"parallel.ep ({par.ep}) > 1 needs an MoE model, but moe.num_experts "
                          f"({cfg.moe.num_experts}) / moe.every ({cfg.moe.every}) make it dense; set ep=1")
    _require(cfg.model.n_heads % par.tp == 0,
             f"model.n_heads ({cfg.model.n_heads}) must be divisible by parallel.tp ({par.tp}); "
             f"use tp in {[d for d in _divisors(cfg.model.n_heads) if world_size % d == 0]}")
    if par.tp > 1 and par.sequence_parallel:
        _require(cfg.data.seq_len % par.tp == 0,
                 f"data.seq_len ({cfg.data.seq_len}) must be divisible by parallel.tp ({par.tp}) with "
                 f"sequence parallelism; use seq_len={_round_up(cfg.data.seq_len, par.tp)}")
    train = cfg.train
    per_step = train.micro_batch_size * dp
    _require(train.global_batch_size % per_step == 0,
             f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
             f"train.micro_batch_size ({train.micro_batch_size}) x dp ({dp}) = {per_step}; "
             f"use global_batch_size={_round_up(train.global_batch_size, per_step)}")
    if train.engine == "deepspeed":
        _validate_deepspeed(cfg, world_size)


def _validate_deepspeed(cfg: Config, world_size: int) -> None:
    """What train.engine=deepspeed supports (docs/deepspeed.md says why)."""
    par, stage = cfg.parallel, cfg.zero.stage
    _require(world_size > 1, "train.engine=deepspeed needs at least 2 ranks (launch with torchrun, deepspeed "
                             "or mpirun); for one process use train.engine=native")
    _require(par.tp == 1, f"train.engine=deepspeed with parallel.tp ({par.tp}) > 1 is not supported: "
                          "DeepSpeed's data-parallel group would span the tp ranks; use tp=1 or train.engine=native")
    if cfg.moe.enabled and stage == 3:
        raise ConfigError(
            "zero.stage (3) with an MoE model: ZeRO-3 partitions every parameter over the whole data-"
            "parallel world and gathers it before each use, but moe_dist's expert weights differ from ep "
            "rank to ep rank (DeepSpeed 0.19 partitions experts over their expert-data-parallel group "
            "only for its own AutoEP layers; with ep=1 the MoE layer's backward fails under ZeRO-3's parameter "
            "partitioning); use zero.stage=2 (expert gradients and optimizer state are "
            "partitioned over the expert-data-parallel group, dense ones over all ranks), or zero.stage=3 "
            "with a dense model")
    if cfg.moe.enabled and par.ep > 1 and stage == 0:
        raise ConfigError(
            f"zero.stage (0) with parallel.ep ({par.ep}) > 1: DeepSpeed's non-ZeRO path measures the gradient "
            "norm as the mean of per-rank norms, which differs from the global norm once ranks hold different "
            "experts; use zero.stage=1 (the same update, optimizer state partitioned) or train.engine=native")


def grad_accum_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def _divisors(n: int, limit: int | None = None) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return divs if limit is None else [d for d in divs if d <= limit]


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
