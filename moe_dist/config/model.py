"""The ``model`` section and the sections of the seed architectures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from moe_dist.config.errors import divisors, require, round_up


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
    """SwitchAll: every MLP is a sigma-MoE (sigmoid gate, no renormalisation, entropy regulariser
    over the data-parallel batch) built from the moe section (num_experts = N_E, expert_ffn_dim =
    G, router.top_k = K); needs moe.every=1 (docs/architectures.md)."""
    entropy_reg: float = 0.001
    """Weight gamma of the sigma-MoE entropy regulariser -gamma * H(mean_t softmax(u_t)), the mean
    taken over the tokens of all data-parallel ranks (SwitchAll only). 0 disables it."""
    expert_dropout: float = 0.0
    """Expert dropout delta of the sigma-MoE (SwitchAll only): in training, each sigmoid score is
    set to 0 with this probability before the top-k (the paper's big runs use 0.1). 0 disables it."""
    expert_activation: Literal["relu", "swiglu"] = "relu"
    """Experts of the sigma-MoE (SwitchAll only): 'relu' is the paper's two-layer ReLU(x W1) W2
    with expert_ffn_dim = G, 'swiglu' the repository's gated experts."""

    def __post_init__(self) -> None:
        require(self.n_heads >= 0 and self.head_dim >= 0,
                 f"model.switchhead.n_heads ({self.n_heads}) and head_dim ({self.head_dim}) must be >= 0 "
                 "(0 = derive from model)")
        require(self.num_experts >= 1, f"model.switchhead.num_experts ({self.num_experts}) must be >= 1")
        require(1 <= self.top_k <= self.num_experts,
                 f"model.switchhead.top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        require(self.head_dim % 2 == 0, f"model.switchhead.head_dim ({self.head_dim}) must be even (rotary)")
        require(self.entropy_reg >= 0, f"model.switchhead.entropy_reg ({self.entropy_reg}) must be >= 0")
        require(0 <= self.expert_dropout < 1,
                 f"model.switchhead.expert_dropout ({self.expert_dropout}) must be in [0, 1) (0 disables it)")


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
    query_norm: Literal["batchnorm", "layernorm", "none"] = "layernorm"
    """Normalisation of the query: LayerNorm per token (causal: the default for language
    modelling), BatchNorm over the batch (the paper's; its training statistics mix every token of
    the batch, later positions included, so it is not causal; per-rank statistics under data
    parallelism), or none."""
    activation: Literal["gelu", "relu"] = "gelu"
    """Activation phi of the single-neuron experts."""

    def __post_init__(self) -> None:
        side = math.isqrt(max(self.num_experts, 0))
        require(self.num_experts > 0 and side * side == self.num_experts,
                 f"model.peer.num_experts ({self.num_experts}) must be a perfect square n*n; "
                 f"use {side * side} or {(side + 1) ** 2}")
        require(self.heads >= 1, f"model.peer.heads ({self.heads}) must be >= 1")
        require(1 <= self.top_k <= side,
                 f"model.peer.top_k ({self.top_k}) must be in [1, sqrt(num_experts)={side}]; lower top_k "
                 "or raise num_experts")
        require(self.query_dim >= 0 and self.query_dim % 2 == 0,
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
        require(self.heads >= 1, f"model.mh_moe.heads ({self.heads}) must be >= 1")
        require(self.num_experts >= 0 and self.expert_ffn_dim >= 0,
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
    second_expert: Literal["top2", "sampling"] = "top2"
    """How each pass picks its second expert in training: 'top2' (deterministic) or 'sampling',
    the reference's policy (fairseq's top-2 gate): the argmax of Gumbel-perturbed logits over
    the visible experts other than the first. Needs moe.router.top_k=2. Evaluation always takes
    the deterministic top-2. A pass's first expert, which decides the token's next stratum, is
    never sampled."""

    def __post_init__(self) -> None:
        require(len(self.strata) >= 1 and all(n >= 1 for n in self.strata),
                 f"model.stratified.strata ({self.strata}) must be a non-empty list of positive sizes")


@dataclass(kw_only=True)
class MoAConfig:
    """Mixture of attention heads (model.arch=moa; Zhang et al. 2022, ALGORITHMS.md section 10):
    per token a softmax router picks top_k of num_experts attention experts, each with its own
    query and output projections; keys and values are shared and one head wide.

    The zeros derive the parameter-parity sizes (docs/architectures.md): head_dim = model.dim /
    model.n_heads, top_k = model.n_heads (as many attention maps as the dense model) and
    num_experts = 2 * model.n_heads - 1, which gives (E + 1) * 2 * d * d_h = 4 * d^2, the dense
    attention's parameters (plus the d x E router)."""

    num_experts: int = 0
    """Attention experts E. 0 means 2 * model.n_heads - 1 (parameter parity)."""
    top_k: int = 0
    """Experts (attention maps) per token k. 0 means model.n_heads."""
    head_dim: int = 0
    """Width d_h of one expert's query/output and of the shared key/value. 0 means
    model.dim // model.n_heads; must be even (rotary)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch load-balancing loss E * sum_e f_e * P_e (f over all T*k selections,
    the reference's compute_switchloss). 0 disables it."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss mean_t logsumexp(u_t)^2 (the reference's compute_zloss).
    0 disables it."""

    def __post_init__(self) -> None:
        require(self.num_experts >= 0 and self.top_k >= 0 and self.head_dim >= 0,
                 f"model.moa.num_experts ({self.num_experts}), top_k ({self.top_k}) and head_dim "
                 f"({self.head_dim}) must be >= 0 (0 = derive from model)")
        require(self.num_experts == 0 or self.top_k <= self.num_experts,
                 f"model.moa.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        require(self.head_dim % 2 == 0, f"model.moa.head_dim ({self.head_dim}) must be even (rotary)")
        require(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0,
                 f"model.moa.aux_loss_coef ({self.aux_loss_coef}) and z_loss_coef ({self.z_loss_coef}) "
                 "must be >= 0 (0 disables)")

    def resolved(self, dim: int, n_heads: int) -> tuple[int, int, int]:
        """(num_experts, top_k, head_dim) with the zeros derived from model.dim and n_heads."""
        top_k = self.top_k or n_heads
        num_experts = self.num_experts or 2 * n_heads - 1
        return num_experts, top_k, self.head_dim or dim // n_heads


@dataclass(kw_only=True)
class HMoEConfig:
    """Heterogeneous MoE (model.arch=hmoe; Wang et al. 2024, arXiv 2408.10681): the experts of
    one layer have different FFN widths; a softmax top-k router (moe.router.top_k) picks them and
    the paper's P-Penalty loss steers tokens toward the small ones (docs/architectures.md)."""

    widths: list[int] = field(default_factory=list)
    """FFN width of every expert, moe.num_experts entries. Empty derives a geometric schedule:
    width_i proportional to ratio**i, scaled so the mean width is moe.expert_ffn_dim (rounded to
    multiples of 8), i.e. the same mean FLOPs per routed token as the homogeneous layer."""
    ratio: float = 2.0
    """Ratio between neighbouring widths of the derived geometric schedule (1.0 = homogeneous).
    Unused when widths is set."""
    p_penalty_coef: float = 0.01
    """Weight of the P-Penalty loss E * sum_i (w_i / mean w) * f_i * P_i (f_i: share of routed
    assignments, P_i: mean router probability). 0 disables it."""
    balance_coef: float = 0.0
    """Weight of the usual Switch balance loss E * sum_i f_i * P_i (the paper notes it pushes
    tokens toward large experts and replaces it). 0 disables it."""
    entropy_coef: float = 0.0
    """Weight of the router entropy loss mean_t -sum_i p_ti log p_ti (the paper's companion of
    Top-P routing; here with top-k). 0 disables it."""
    gemm: Literal["by_width", "padded", "per_expert"] = "by_width"
    """Expert compute: one grouped GEMM per width group ('by_width'), one grouped GEMM with every
    expert zero-padded to the largest width ('padded'), or one matmul per expert ('per_expert').
    All three compute the same function; on CPU by_width beat padded 1.4-2.8x and per_expert beat
    both (docs/architectures.md, HMoE)."""

    def __post_init__(self) -> None:
        require(all(w >= 1 for w in self.widths), f"model.hmoe.widths ({self.widths}) must be positive")
        require(self.ratio >= 1.0, f"model.hmoe.ratio ({self.ratio}) must be >= 1")
        require(min(self.p_penalty_coef, self.balance_coef, self.entropy_coef) >= 0,
                 f"model.hmoe loss coefficients ({self.p_penalty_coef}, {self.balance_coef}, "
                 f"{self.entropy_coef}) must be >= 0 (0 disables)")


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["transformer", "switchhead", "peer", "mh_moe", "stratified", "moa", "hmoe"] = "transformer"
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
    init_from: str = ""
    """Initial weights instead of a random init: a moe_dist run directory (its newest checkpoint)
    or checkpoint directory, or a local Hugging Face dense Llama directory (config.json +
    safetensors). Same-shaped tensors are copied, dense MLPs upcycled into MoE layers
    (docs/interop.md). Weights only: the optimizer and step start afresh. '' means random init."""
    upcycle_mode: Literal["copy", "partition"] = "copy"
    """How model.init_from turns a dense MLP into an MoE layer: 'copy' makes every expert a copy
    (step 0 computes the dense function), 'partition' splits the MLP's neurons among the experts."""
    upcycle_noise_std: float = 0.0
    """Std of Gaussian noise added to each upcycled expert's weights (breaks the copies' symmetry).
    0 disables it."""
    switchhead: SwitchHeadConfig = field(default_factory=SwitchHeadConfig)
    """Options of model.arch=switchhead."""
    peer: PEERConfig = field(default_factory=PEERConfig)
    """Options of model.arch=peer."""
    mh_moe: MHMoEConfig = field(default_factory=MHMoEConfig)
    """Options of model.arch=mh_moe."""
    stratified: StratifiedConfig = field(default_factory=StratifiedConfig)
    """Options of model.arch=stratified."""
    hmoe: HMoEConfig = field(default_factory=HMoEConfig)
    """Options of model.arch=hmoe."""
    moa: MoAConfig = field(default_factory=MoAConfig)
    """Options of model.arch=moa."""

    def __post_init__(self) -> None:
        require(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0,
                 f"model.dim ({self.dim}), model.n_layers ({self.n_layers}) and model.n_heads "
                 f"({self.n_heads}) must be positive")
        require(self.dim % self.n_heads == 0,
                 f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}); "
                 f"try n_heads in {divisors(self.dim, limit=64)}")
        require((self.dim // self.n_heads) % 2 == 0,
                 f"head size model.dim/model.n_heads ({self.dim // self.n_heads}) must be even "
                 "for rotary embeddings")
        require(self.vocab_size >= 0, f"model.vocab_size ({self.vocab_size}) must be >= 0 (0 = from tokenizer)")
        require(self.max_seq_len > 0, f"model.max_seq_len ({self.max_seq_len}) must be positive")
        require(self.upcycle_noise_std >= 0,
                 f"model.upcycle_noise_std ({self.upcycle_noise_std}) must be >= 0 (0 disables it)")
        if self.ffn_dim == 0:
            self.ffn_dim = round_up(int(8 * self.dim / 3), 16)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
