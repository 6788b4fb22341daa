"""Decoder-only transformer LM: RMSNorm, rotary positions, causal SDPA attention, SwiGLU MLPs,
with every ``moe.every``-th block's MLP a :class:`MoELayer`.

Built from config sections alone and written for one device; tensor and expert parallelism
are applied afterwards by ``moe_dist.distributed``. ``forward`` returns logits and the
router losses summed over layers, so nothing is stashed on the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.moe.experts import init_std_for_output
from moe_dist.moe.layer import MoELayer, SwiGLU
from moe_dist.moe.routing.variable_k import causal_importance


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted router losses


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()  # [S, head_dim/2] each


def apply_rotary(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos_Sd - x2 * sin_Sd, x1 * sin_Sd + x2 * cos_Sd), dim=-1)
    return rotated.flatten(-2).to(x_BHSd.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention. ``n_heads`` is the number of heads this module holds
    (tensor parallelism shrinks it to the local share)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                with_importance: bool = False):
        """The attention output; with ``with_importance`` also each token's DA-MoE importance
        [B, S] from these attention probabilities (``causal_importance``)."""
        batch, seq_len, _ = x_BSD.shape
        q, k, v = (proj(x_BSD).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.wq, self.wk, self.wv))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))
        return (out, causal_importance(q, k)) if with_importance else out


class Block(nn.Module):
    def __init__(self, layer_idx: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.attention = Attention(model_cfg.dim, model_cfg.n_heads)
        self.mlp_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.is_moe = moe_cfg.is_moe_layer(layer_idx)
        self.mlp = (MoELayer(model_cfg.dim, model_cfg.ffn_dim, moe_cfg) if self.is_moe
                    else SwiGLU(model_cfg.dim, model_cfg.ffn_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if self.is_moe and isinstance(self.attention, Attention) and getattr(self.mlp, "uses_token_importance", False):
            # DA-MoE: the router allocates experts from this block's own attention probabilities.
            attn_out, importance_BS = self.attention(self.attention_norm(x), cos, sin, with_importance=True)
            x = x + attn_out
            mlp_out, losses = self.mlp(self.mlp_norm(x), importance_BS)
            return x + mlp_out, losses
        x = x + self.attention(self.attention_norm(x), cos, sin)
        if self.is_moe:
            mlp_out, losses = self.mlp(self.mlp_norm(x))
        else:
            mlp_out, losses = self.mlp(self.mlp_norm(x)), {}
        return x + mlp_out, losses


class Transformer(nn.Module):
    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        if model_cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
        self.tok_embeddings = nn.Embedding(model_cfg.vocab_size, model_cfg.dim)
        self.layers = nn.ModuleList(Block(i, model_cfg, moe_cfg) for i in range(model_cfg.n_layers))
        self.norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.output = nn.Linear(model_cfg.dim, model_cfg.vocab_size, bias=False)
        if model_cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(model_cfg.head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.model_cfg.init_std
        out_std = init_std_for_output(std, self.model_cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output_proj = name.endswith(("wo", "w2"))
                nn.init.normal_(module.weight, std=out_std if is_output_proj else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoELayer):
                module.experts.reset_parameters(std, out_std)
                module.router.reset_parameters(std)

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(block.layer_idx, block.mlp) for block in self.layers if block.is_moe]

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        seq_len = tokens_BS.shape[1]
        if seq_len > self.model_cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len ({self.model_cfg.max_seq_len})")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        h = self.tok_embeddings(tokens_BS)
        totals: dict[str, torch.Tensor] = {}
        for block in self.layers:
            h, losses = block(h, cos, sin)
            for name, value in losses.items():
                totals[name] = totals[name] + value if name in totals else value
        logits = self.output(self.norm(h))
        return ModelOutput(logits, totals)
