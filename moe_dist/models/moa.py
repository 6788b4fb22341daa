"""MoA: mixture of attention heads (Zhang et al., EMNLP 2022; ALGORITHMS.md section 10).

Per token t, with E attention experts of width d_h and k selected:

1. router: logits ``u_t = x_t W_g`` [E] (fp32), ``p_t = softmax(u_t)``, ``S_t = top-k(p_t)``;
   the selected probabilities are not renormalised (as the reference);
2. shared key and value, one head wide: ``K = X W_k``, ``V = X W_v`` [T, d_h] (rotary on q and k);
3. per selected expert e: query ``q_{t,e} = x_t W_q^e`` and one causal attention read
   ``a_{t,e} = Attn(q_{t,e}, K, V)`` -- k attention maps per token, like k heads of a
   multi-query attention whose query weights the router picks per token;
4. output ``y_t = sum_{e in S_t} p_{t,e} a_{t,e} W_o^e``.

Both expert sides run as one grouped GEMM over the E experts (permute by expert id). The k
slots are laid out as heads of one SDPA call against the single shared K/V head.

Losses (ALGORITHMS.md section 10, the reference's run.sh): the Switch balance loss
``E * sum_e f_e P_e`` (f_e = share of the T*k selections, P_e = mean probability; 1 at perfect
balance), weight 0.01, and the z-loss ``mean_t logsumexp(u_t)^2``, weight 0.001, per micro-batch
and summed over layers like the MoE MLP's router losses. Named ``moa_aux_loss`` / ``moa_z_loss``
so they stay apart from the MLP's ``aux_loss`` / ``z_loss`` in the logs.

Deviations from the reference (yikangshen/MoA): no noisy gating and no CV loss (its default
weight is 0); rotary positions and a causal decoder instead of the encoder-decoder with
sinusoidal positions; the router is one bias-free linear layer.

The attention experts stay replicated under expert parallelism (they are small, as SwitchHead's;
ALGORITHMS.md section 1(f)); MoE MLPs in the same model are sharded as usual.

Expert-load stats: ids 0..E-1 count the attention experts; in a block with an MoE MLP one
block-wide ``load_stats`` holds these followed by the MLP's experts.

Shapes: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top_k, d_h head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, ModelConfig, MoEConfig
from moe_dist.config.model import MoAConfig
from moe_dist.models.arch_base import ArchTransformer
from moe_dist.models.switchhead import StatsSlice
from moe_dist.models.transformer import Block, apply_rotary, rotary_tables
from moe_dist.moe.dispatch.permutation import PermuteState, count_per_expert, permute, unpermute
from moe_dist.moe.experts import grouped_matmul
from moe_dist.moe.routing import balance
from moe_dist.moe.stats import ExpertLoadStats


class MoAAttention(nn.Module):
    """Causal mixture-of-attention-heads layer; ``forward`` returns (output, weighted losses)."""

    def __init__(self, dim: int, cfg: MoAConfig, default_heads: int, grouped_gemm: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.top_k, self.head_dim = cfg.resolved(dim, default_heads)
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moa.top_k ({self.top_k}) must be <= num_experts ({self.num_experts}); "
                              "set model.moa.num_experts or model.moa.top_k")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"MoA head width {self.head_dim} must be even for rotary embeddings; "
                              "set model.moa.head_dim")
        self.dim = dim
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.backend = grouped_gemm
        self.router = nn.Parameter(torch.empty(self.num_experts, dim))  # W_g
        self.wk = nn.Linear(dim, self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.head_dim, bias=False)
        self.w_q = nn.Parameter(torch.empty(self.num_experts, dim, self.head_dim))
        self.w_o = nn.Parameter(torch.empty(self.num_experts, self.head_dim, dim))
        self.stats = ExpertLoadStats(self.num_experts)
        self.reset_arch_parameters(0.02, 0.02)

    @torch.no_grad()
    def reset_arch_parameters(self, std: float, out_std: float) -> None:
        for weight in (self.router, self.wk.weight, self.wv.weight, self.w_q):
            nn.init.normal_(weight, std=std)
        nn.init.normal_(self.w_o, std=out_std)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E] fp32, probs [T, E], gates [T, K] = selected probs, ids [T, K])."""
        logits = F.linear(x_TD.float(), self.router.float())
        probs = torch.softmax(logits, dim=-1)
        gates, ids = torch.topk(probs, self.top_k, dim=-1, sorted=True)
        return logits, probs, gates, ids

    def losses(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted balance and z losses of one micro-batch (training only)."""
        out: dict[str, torch.Tensor] = {}
        if self.aux_loss_coef > 0:
            counts = count_per_expert(ids_TK.flatten(), self.num_experts)
            out["moa_aux_loss"] = self.aux_loss_coef * balance.switch_aux_loss(probs_TE, counts, self.top_k)
        if self.z_loss_coef > 0:
            out["moa_z_loss"] = self.z_loss_coef * balance.z_loss(logits_TE)
        return out

    def _experts(self, rows: torch.Tensor, rows_per_item: int, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 weight: torch.Tensor, per_slot: bool) -> torch.Tensor:
        """``rows[item] @ weight[id]`` for every (token, slot), one grouped GEMM over E experts.

        ``per_slot``: return [T*K, out] (one row per slot, unweighted); otherwise the
        ``weights_TK``-weighted sum over the slots, [T, out].
        """
        num_tokens, top_k = ids_TK.shape
        sorted_rows, counts, state = permute(rows, ids_TK.reshape(-1, rows_per_item), weight.shape[0])
        out_sorted = grouped_matmul(sorted_rows, weight, counts, self.backend)
        # Assignment n = t*K + k in both layouts; only the item count differs.
        if per_slot:  # every assignment is its own item
            state = PermuteState(state.sort_order_N, None, num_tokens * top_k, 1)
            return unpermute(out_sorted, weights_TK.reshape(-1, 1), state)
        state = PermuteState(state.sort_order_N, None, num_tokens, top_k)
        return unpermute(out_sorted, weights_TK, state)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, seq_len, dim = x_BSD.shape
        top_k, d_h = self.top_k, self.head_dim
        x_TD = x_BSD.reshape(-1, dim)
        # Step 1: route.
        logits, probs, gates, ids = self.route(x_TD)  # [T, E], [T, E], [T, K], [T, K]
        # Step 2: the shared key and value, one head.
        k, v = (proj(x_BSD).view(batch, seq_len, 1, d_h).transpose(1, 2) for proj in (self.wk, self.wv))
        # Step 3: the k experts' queries, slots as heads, then one attention read per slot.
        q_TKd = self._experts(x_TD, top_k, ids, torch.ones_like(gates, dtype=x_TD.dtype), self.w_q, per_slot=True)
        q = q_TKd.view(batch, seq_len, top_k, d_h).transpose(1, 2)  # [B, K, S, d_h]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k.expand(-1, top_k, -1, -1), v.expand(-1, top_k, -1, -1),
                                              is_causal=True)  # [B, K, S, d_h]
        # Step 4: each slot through its expert's output projection, weighted by p and summed.
        rows = attn.transpose(1, 2).reshape(-1, d_h)  # [T*K, d_h], row t*K + k
        y_TD = self._experts(rows, 1, ids, gates.to(rows.dtype), self.w_o, per_slot=False)
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            losses = self.losses(logits, probs, ids)
            self._record(ids)
        return y_TD.view(batch, seq_len, dim), losses

    @torch.no_grad()
    def _record(self, ids_TK: torch.Tensor) -> None:
        counts = count_per_expert(ids_TK.flatten(), self.num_experts)
        self.stats.update(counts, counts, ids_TK.shape[0])

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward matmul FLOPs of one token: shared k/v, K queries and outputs, K attention
        maps (scores and weighted sum over (S+1)/2 keys on average), router."""
        d, d_h, top_k = self.dim, self.head_dim, self.top_k
        projections = 2 * 2 * d * d_h + 2 * 2 * top_k * d * d_h
        scores = 2 * 2 * top_k * d_h * (seq_len + 1) / 2
        return {"attention": projections + scores, "router": 2.0 * d * self.num_experts}

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, head_dim={self.head_dim}"


class MoABlock(Block):
    """A block whose attention also returns losses (merged with the MLP's)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        attn_out, losses = self.attention(self.attention_norm(x), cos, sin)
        x = x + attn_out
        if not self.is_moe:
            return x + self.mlp(self.mlp_norm(x)), losses
        mlp_out, mlp_losses = self.mlp(self.mlp_norm(x))
        merged = dict(losses)
        for name, value in mlp_losses.items():
            merged[name] = merged[name] + value if name in merged else value
        return x + mlp_out, merged


class MoATransformer(ArchTransformer):
    """Every block's attention is MoA; MLPs as the plain model (MoE every moe.every-th block)."""

    def install(self) -> None:
        model_cfg = self.model_cfg
        if self.moe_cfg.enabled and self.moe_cfg.router.type == "da_moe":
            raise ConfigError("moe.router.type=da_moe needs dense attention probabilities; model.arch=moa "
                              "has none; use another router")
        for i, old in enumerate(self.layers):
            block = MoABlock(old.layer_idx, model_cfg, self.moe_cfg)
            block.mlp = old.mlp
            block.attention = attention = MoAAttention(model_cfg.dim, model_cfg.moa, model_cfg.n_heads,
                                                       self.moe_cfg.grouped_gemm)
            if block.is_moe:  # one stats module per block: [attention experts | MLP experts]
                width = attention.stats.num_experts
                block.load_stats = ExpertLoadStats(width + block.mlp.num_experts)
                attention.stats = StatsSlice(block.load_stats, 0, count_tokens=True)
                block.mlp.stats = StatsSlice(block.load_stats, width, count_tokens=False)
            self.layers[i] = block
        head_dim = self.layers[0].attention.head_dim
        self.rope_cos, self.rope_sin = rotary_tables(head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)


def dense_attention_params(dim: int) -> int:
    """Parameters of the dense attention MoA is sized against: W_q, W_k, W_v, W_o (4 d^2)."""
    return 4 * dim * dim


def moa_attention_params(dim: int, num_experts: int, head_dim: int) -> int:
    """Parameters of one MoA layer: E query and output experts, shared K/V, router."""
    return 2 * (num_experts + 1) * dim * head_dim + dim * num_experts
