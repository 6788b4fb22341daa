"""SwitchHead attention and SwitchAll (Csordas et al., arXiv 2312.07987; ALGORITHMS.md section 1).

Per head h (of H, width d_h) and token t, with E experts per head and k selected:

* queries and keys are dense: ``Q^h = X W_Q^h``, ``K^h = X W_K^h`` (rotary on both);
* value side: scores ``a = sigmoid(X W_S^h)`` [T, E], ``S_t = top-k(a_t)``,
  ``V^h_t = sum_{e in S_t} a_{t,e} X_t W_V^{h,e}``;
* attention ``A^h = softmax(Q^h K^h^T / sqrt(d_h) + causal)`` (the reference scales q and k by
  d_h^-1/4 each; the product is the same);
* output side: ``b = sigmoid(X W_D^h)``, ``D_t = top-k(b_t)``,
  ``Y_t = sum_h sum_{e in D_t} b_{t,e} (A^h V^h)_t W_O^{h,e}``.

Gates are raw sigmoid values (no renormalisation), there is no balancing loss. Expert ids are
global ``h*E + e``, so one grouped GEMM over H*E experts runs each side. With W_S = W_D = 0 and
k = 2 identical experts per head, both sides weigh the expert by sigmoid(0)*2 = 1 and the
module equals dense multi-head attention with the same W_Q/W_K/W_V/W_O (tests/unit).

SwitchAll makes every MLP a sigma-MoE (ALGORITHMS.md section 2; needs moe.every=1): sigmoid
top-k gate without renormalisation, ReLU two-layer experts, expert dropout, and the entropy
regulariser ``-gamma * H(mean_t softmax(u_t))`` over the data-parallel batch. It is an
:class:`~moe_dist.moe.layer.MoELayer`, so expert parallelism shards it like any MoE MLP; the
attention experts stay replicated (they are tiny; ALGORITHMS.md section 1(f)).

Expert-load stats: ids 0..H*E-1 count the value experts, H*E..2*H*E-1 the output experts; in a
block with an MoE MLP one block-wide ``load_stats`` holds these followed by the MLP's experts.

Shapes: B batch, S sequence, T = B*S tokens, D model dim, H heads, E experts per head, K top_k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, MoEConfig, SwitchHeadConfig
from moe_dist.models.arch_base import ArchTransformer
from moe_dist.models.transformer import apply_rotary, rotary_tables
from moe_dist.moe.dispatch.permutation import PermuteState, count_per_expert, permute, unpermute
from moe_dist.moe.experts import GroupedExperts, grouped_matmul, to_autocast_dtype
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.routing.result import RoutingResult
from moe_dist.moe.stats import ExpertLoadStats


class SwitchHeadAttention(nn.Module):
    """Causal self-attention with mixture-of-experts value and output projections."""

    def __init__(self, dim: int, cfg: SwitchHeadConfig, default_heads: int, grouped_gemm: str = "auto") -> None:
        super().__init__()
        heads = cfg.n_heads or default_heads
        if cfg.head_dim == 0 and dim % heads != 0:
            raise ConfigError(f"model.dim ({dim}) must be divisible by model.switchhead.n_heads ({heads}), "
                              "or set model.switchhead.head_dim explicitly")
        self.n_heads = heads
        self.head_dim = cfg.head_dim or dim // heads
        if self.head_dim % 2 != 0:
            raise ConfigError(f"SwitchHead head width {self.head_dim} (model.dim / model.switchhead.n_heads) "
                              "must be even for rotary embeddings; set model.switchhead.head_dim")
        self.dim = dim
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.backend = grouped_gemm
        inner = heads * self.head_dim
        pool = heads * cfg.num_experts
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.sel_v = nn.Parameter(torch.empty(pool, dim))  # W_S, row h*E+e
        self.sel_o = nn.Parameter(torch.empty(pool, dim))  # W_D
        self.w_v = nn.Parameter(torch.empty(pool, dim, self.head_dim))
        self.w_o = nn.Parameter(torch.empty(pool, self.head_dim, dim))
        # Expert ids 0..H*E-1 are the value experts, H*E..2*H*E-1 the output experts.
        self.stats = ExpertLoadStats(2 * pool)
        self.reset_arch_parameters(0.02, 0.02)

    @torch.no_grad()
    def reset_arch_parameters(self, std: float, out_std: float) -> None:
        for weight in (self.wq.weight, self.wk.weight, self.sel_v, self.sel_o, self.w_v):
            nn.init.normal_(weight, std=std)
        nn.init.normal_(self.w_o, std=out_std)

    def select(self, x_TD: torch.Tensor, selector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid gate per head: (gates [T, H, K] fp32, global expert ids [T, H, K])."""
        num_tokens = x_TD.shape[0]
        scores = torch.sigmoid(F.linear(x_TD.float(), selector.float()))
        scores = scores.view(num_tokens, self.n_heads, self.num_experts)
        _, local = torch.topk(scores.detach(), self.top_k, dim=-1, sorted=True)
        gates = scores.gather(-1, local)
        offsets = torch.arange(self.n_heads, device=x_TD.device).view(1, -1, 1) * self.num_experts
        return gates, local + offsets

    def _mix(self, rows: torch.Tensor, rows_per_item: int, ids_THK: torch.Tensor, gates_THK: torch.Tensor,
             weight: torch.Tensor) -> torch.Tensor:
        """``out[t, h] = sum_k gate * rows[item] @ weight[id]``, one grouped GEMM over H*E experts.

        ``rows`` holds one row per token (value side, shared by the heads: rows_per_item = H*K)
        or one per (token, head) (output side: rows_per_item = K). Returns [T*H, out_features].
        """
        num_tokens, heads, top_k = ids_THK.shape
        rows = to_autocast_dtype(rows)  # grouped_mm is not an autocast op: bf16 rows, not fp32
        sorted_rows, counts, state = permute(rows, ids_THK.reshape(-1, rows_per_item), weight.shape[0])
        out_sorted = grouped_matmul(sorted_rows, weight, counts, self.backend)
        # Assignment n = (t*H + h)*K + k in both layouts, so un-sorting per (token, head) item
        # only needs the item count changed.
        per_head = PermuteState(state.sort_order_N, None, num_tokens * heads, top_k)
        return unpermute(out_sorted, gates_THK.reshape(num_tokens * heads, top_k), per_head)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x_BSD.shape
        heads, d_h, top_k = self.n_heads, self.head_dim, self.top_k
        x_TD = x_BSD.reshape(-1, dim)
        q, k = (proj(x_BSD).view(batch, seq_len, heads, d_h).transpose(1, 2) for proj in (self.wq, self.wk))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        gates_v, ids_v = self.select(x_TD, self.sel_v)  # [T, H, K]
        v_THd = self._mix(x_TD, heads * top_k, ids_v, gates_v, self.w_v)
        v = v_THd.view(batch, seq_len, heads, d_h).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True)  # [B, H, S, d_h]

        gates_o, ids_o = self.select(x_TD, self.sel_o)
        attn_rows = attn.transpose(1, 2).reshape(-1, d_h)  # [T*H, d_h], item t*H + h
        y = self._mix(attn_rows, top_k, ids_o, gates_o, self.w_o)  # [T*H, D]
        if self.training:
            self._record(ids_v, ids_o)
        return y.view(-1, heads, dim).sum(1).view(batch, seq_len, dim)

    @torch.no_grad()
    def _record(self, ids_v: torch.Tensor, ids_o: torch.Tensor) -> None:
        pool = self.n_heads * self.num_experts
        counts = count_per_expert(torch.cat([ids_v.flatten(), ids_o.flatten() + pool]), 2 * pool)
        self.stats.update(counts, counts, ids_v.shape[0])

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward matmul FLOPs of one token: q/k, H*K value and output experts, scores, gates."""
        d, heads, d_h, top_k = self.dim, self.n_heads, self.head_dim, self.top_k
        projections = 2 * 2 * d * heads * d_h + 2 * 2 * heads * top_k * d * d_h
        scores = 2 * 2 * heads * d_h * (seq_len + 1) / 2
        return {"attention": projections + scores, "router": 2.0 * 2 * d * heads * self.num_experts}

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, head_dim={self.head_dim}, experts_per_head={self.num_experts}, top_k={self.top_k}"


class StatsSlice(nn.Module):
    """Counters of one module written into ``[offset, offset + n)`` of a block-wide
    :class:`ExpertLoadStats`: the expert-load tracker takes one stats module per block, and a
    SwitchHead block with an MoE MLP has two routed parts (attention experts first)."""

    def __init__(self, target: ExpertLoadStats, offset: int, count_tokens: bool) -> None:
        super().__init__()
        self._target = [target]  # a plain list: the block owns (and moves) the target
        self.offset = offset
        self.count_tokens = count_tokens

    @torch.no_grad()
    def update(self, routed: torch.Tensor, kept: torch.Tensor, num_tokens: int) -> None:
        target = self._target[0]
        pad = (self.offset, target.num_experts - self.offset - routed.numel())
        target.update(F.pad(routed.float(), pad), F.pad(kept.float(), pad), num_tokens if self.count_tokens else 0)

    def reset(self) -> None:
        """The tracker resets the block's target."""


class SigmaMoELayer(MoELayer):
    """sigma-MoE MLP (ALGORITHMS.md section 2), per token x with logits ``u = x W_sel^T``:

    1. scores ``s = sigmoid(u)`` (fp32);
    2. training only, expert dropout: each ``s_e`` is set to 0 with probability delta (the
       reference's full layer; its ``-inf`` variant can pick a ``-inf`` weight and give NaN);
    3. ``I = top-K(s)`` and ``y = sum_{e in I} s_e * ReLU(x W1_e) W2_e``: the gathered weights are
       the (masked) scores, never renormalised; no Switch loss, no shared expert;
    4. training only, the entropy regulariser ``gamma * -H(p_bar)``, ``p_bar = mean_t
       softmax(u_t)`` over the raw logits (before dropout), in log space. ``entropy_reduce_fn``
       (injected by ``models/arch_parallel.py``; None on one process) makes the mean global over
       the data-parallel ranks.

    ``activation='swiglu'`` swaps in the repository's gated experts.
    """

    def __init__(self, dim: int, ffn_dim: int, moe_cfg: MoEConfig, entropy_reg: float,
                 expert_dropout: float = 0.0, activation: str = "relu") -> None:
        router = dataclasses.replace(moe_cfg.router, type="sigmoid_topk", normalize_weights=False,
                                     aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0,
                                     bias_update_rate=0.0)
        super().__init__(dim, ffn_dim, dataclasses.replace(moe_cfg, router=router))
        if activation != "swiglu":
            self.experts = GroupedExperts(self.num_experts, dim, self.expert_ffn_dim, moe_cfg.grouped_gemm,
                                          activation=activation)
        self.entropy_reg = entropy_reg
        self.expert_dropout = expert_dropout
        self.entropy_reduce_fn: EntropyReduceFn | None = None

    def route(self, x_TD: torch.Tensor, seq_len: int | None,
              importance_T: torch.Tensor | None = None) -> RoutingResult:
        logits_TE = self.router.logits(x_TD)  # [T, E] fp32
        scores_TE = torch.sigmoid(logits_TE)
        if self.training and self.expert_dropout > 0:
            keep_TE = torch.rand_like(scores_TE) >= self.expert_dropout
            scores_TE = torch.where(keep_TE, scores_TE, 0.0)
        _, indices_TK = torch.topk(scores_TE.detach(), self.router.top_k, dim=-1, sorted=True)
        weights_TK = scores_TE.gather(1, indices_TK)
        tokens_per_expert = count_per_expert(indices_TK.flatten(), self.num_experts)
        losses = {}
        if self.training and self.entropy_reg > 0:
            losses["entropy_reg"] = self.entropy_reg * neg_entropy_of_mean(logits_TE, self.entropy_reduce_fn)
        return self.limit_to_capacity(RoutingResult(indices_TK, weights_TK, None, scores_TE, tokens_per_expert,
                                                    losses))

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs of one token: the router and K experts (2 matmuls for ReLU, 3 for SwiGLU)."""
        dim = self.experts.dim
        per_expert = 2 * (self.experts.fused_parts + 1) * dim * self.expert_ffn_dim
        return {"router": 2.0 * dim * self.num_experts, "experts": float(self.router.top_k * per_expert),
                "dense": 0.0}


EntropyReduceFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``(log sum_t softmax(u_t) [E] over this rank's tokens, token count) -> the same two over the
data-parallel group``, autograd-correct (``models/arch_parallel.py``)."""


def neg_entropy_of_mean(logits_TE: torch.Tensor, reduce_fn: EntropyReduceFn | None = None) -> torch.Tensor:
    """``-H(p_bar)`` with ``p_bar = mean_t softmax(logits_t)``, in log space (fp32); with
    ``reduce_fn`` the mean runs over every rank's tokens."""
    num_tokens = logits_TE.shape[0]
    log_sum_E = torch.logsumexp(F.log_softmax(logits_TE.float(), dim=-1), dim=0)
    if reduce_fn is None:
        log_p_bar = log_sum_E - math.log(max(num_tokens, 1))
    else:
        log_sum_E, total = reduce_fn(log_sum_E, num_tokens)
        log_p_bar = log_sum_E - total.clamp_min(1).log()
    return (log_p_bar.exp() * log_p_bar).sum()


class SwitchHeadTransformer(ArchTransformer):
    """Every block's attention is SwitchHead; with ``switch_all`` the MoE MLPs are sigma-MoE."""

    def install(self) -> None:
        cfg, model_cfg = self.model_cfg.switchhead, self.model_cfg
        if cfg.switch_all and not (self.moe_cfg.num_experts > 0 and self.moe_cfg.every == 1):
            raise ConfigError(f"model.switchhead.switch_all makes every MLP a sigma-MoE: set moe.every=1 "
                              f"(got {self.moe_cfg.every}) and moe.num_experts > 0 (got {self.moe_cfg.num_experts})")
        for block in self.layers:
            block.attention = attention = SwitchHeadAttention(model_cfg.dim, cfg, model_cfg.n_heads,
                                                              self.moe_cfg.grouped_gemm)
            if cfg.switch_all and block.is_moe:
                block.mlp = SigmaMoELayer(model_cfg.dim, model_cfg.ffn_dim, self.moe_cfg, cfg.entropy_reg,
                                          cfg.expert_dropout, cfg.expert_activation)
            if block.is_moe:  # one stats module per block: [V experts | O experts | MLP experts]
                width = attention.stats.num_experts
                block.load_stats = ExpertLoadStats(width + block.mlp.num_experts)
                attention.stats = StatsSlice(block.load_stats, 0, count_tokens=True)
                block.mlp.stats = StatsSlice(block.load_stats, width, count_tokens=False)
        head_dim = self.layers[0].attention.head_dim
        self.rope_cos, self.rope_sin = rotary_tables(head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)
