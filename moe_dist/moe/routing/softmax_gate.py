"""The linear softmax gate under the variable-k and expert-choice routers: logits, selection
scores with the auxiliary-loss-free bias, and the counts, statistics and losses every such router
returns in its :class:`~moe_dist.moe.routing.result.RoutingResult`.

Shapes: T tokens, D hidden, E experts, K = Kmax slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import RouterConfig
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.routing import balance
from moe_dist.moe.routing.result import RoutingResult


def exclusive_cumsum(x_TE: torch.Tensor) -> torch.Tensor:
    """``out[:, r] = sum_{r' < r} x[:, r']`` (0 for the first column)."""
    return torch.cat([x_TE.new_zeros(x_TE.shape[0], 1), torch.cumsum(x_TE[:, :-1], dim=-1)], dim=-1)


class SoftmaxGate(nn.Module):
    """Linear softmax gate shared by the variable-k and expert-choice routers.

    Buffers: ``expert_bias`` / ``step_counts`` (auxiliary-loss-free selection bias, updated by
    :func:`moe_dist.moe.routing.state.update_selection_bias_from_stats`, exactly as for
    :class:`~moe_dist.moe.routing.top_k.TopKRouter`) and ``k_hist`` (experts-per-token histogram of
    the current logging window, bins 0..Kmax; read and reset by
    :func:`moe_dist.moe.routing.state.routing_metrics`).
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig, max_k: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.max_k = max_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("step_counts", torch.zeros(num_experts), persistent=False)
        self.register_buffer("k_hist", torch.zeros(max_k + 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
        return F.linear(x_TD.float(), self.weight.float())  # [T, E] fp32

    def selection_scores(self, probs_TE: torch.Tensor) -> torch.Tensor:
        """Scores that order the experts: probabilities plus the loss-free bias (no gradient)."""
        probs_TE = probs_TE.detach()
        return probs_TE + self.expert_bias if self.cfg.bias_update_rate > 0 else probs_TE

    def finish(self, indices_TK: torch.Tensor, weights_TK: torch.Tensor, valid_TK: torch.Tensor,
               probs_TE: torch.Tensor, logits_TE: torch.Tensor, seq_len: int | None,
               balance_losses: bool = True) -> RoutingResult:
        """Counts, statistics and losses common to every gate; returns the result."""
        indices_TK = indices_TK.contiguous()
        weights_TK = torch.where(valid_TK, weights_TK, 0.0)
        experts_N = torch.where(valid_TK, indices_TK, self.num_experts).flatten()
        tokens_per_expert = count_per_expert(experts_N, self.num_experts + 1)[:self.num_experts]  # no host sync
        if self.training:
            with torch.no_grad():
                k_T = valid_TK.sum(-1)
                self.k_hist += count_per_expert(k_T, self.max_k + 1).to(self.k_hist.dtype)
                if self.cfg.bias_update_rate > 0:
                    self.step_counts += tokens_per_expert
        losses = self.losses(logits_TE, probs_TE, indices_TK, valid_TK, tokens_per_expert, seq_len,
                             balance_losses)
        return RoutingResult(indices_TK, weights_TK, valid_TK, probs_TE, tokens_per_expert, losses)

    def losses(self, logits_TE, probs_TE, indices_TK, valid_TK, tokens_per_expert, seq_len,
               balance_losses: bool) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        losses: dict[str, torch.Tensor] = {}
        if not self.training or probs_TE.shape[0] == 0:
            return losses
        if balance_losses and cfg.aux_loss_coef > 0:
            losses["aux_loss"] = cfg.aux_loss_coef * balance.variable_k_aux_loss(probs_TE, tokens_per_expert)
        if balance_losses and cfg.seq_aux_loss_coef > 0 and seq_len:
            losses["seq_aux_loss"] = cfg.seq_aux_loss_coef * balance.sequence_aux_loss(
                probs_TE, indices_TK, seq_len, valid_TK)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * balance.z_loss(logits_TE)
        if cfg.entropy_loss_coef > 0:
            losses["entropy_loss"] = cfg.entropy_loss_coef * balance.entropy_loss(probs_TE)
        return losses
