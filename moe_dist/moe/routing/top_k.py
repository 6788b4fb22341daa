"""Token-choice top-k gates: softmax (GShard/Switch/Mixtral) and sigmoid (DeepSeek-V3).

Routing math runs in fp32 whatever the activation dtype.

Shapes: T tokens, D hidden, E experts, K slots per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import RouterConfig
from moe_dist.moe.dispatch.permutation import count_per_expert, use_fast_kernels
from moe_dist.moe.kernels.router_topk import softmax_topk
from moe_dist.moe.routing import balance
from moe_dist.moe.routing.result import RoutingResult


class TopKRouter(nn.Module):
    """Softmax (GShard/Switch/Mixtral) or sigmoid (DeepSeek-V3) top-k gate.

    With ``bias_update_rate > 0`` an auxiliary-loss-free bias is added to the scores for the
    *selection* only; the combine weights use the unbiased scores (Wang et al. 2024).
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        # Selection bias of auxiliary-loss-free balancing; identical on every rank because
        # it is only changed from all-reduced counts (balance.update_selection_bias).
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Assignments of the current optimizer step, summed over micro-batches.
        self.register_buffer("step_counts", torch.zeros(num_experts), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
            x_TD = x_TD * noise
        return F.linear(x_TD.float(), self.weight.float())  # [T, E] fp32

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        bias_E = self.expert_bias if self.cfg.bias_update_rate > 0 else None
        if self.cfg.type != "sigmoid_topk" and use_fast_kernels(logits_TE):
            scores_TE, indices_TK = softmax_topk(logits_TE, self.top_k, bias_E)  # fused Triton
        else:
            if self.cfg.type == "sigmoid_topk":
                scores_TE = torch.sigmoid(logits_TE)
            else:
                scores_TE = torch.softmax(logits_TE, dim=-1)
            selection_TE = scores_TE + bias_E if bias_E is not None else scores_TE
            _, indices_TK = torch.topk(selection_TE.detach(), self.top_k, dim=-1, sorted=True)
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.cfg.normalize_weights and self.top_k > 1:  # k=1: a renormalised weight is 1, no gradient
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        tokens_per_expert = count_per_expert(indices_TK.flatten(), self.num_experts)  # no host sync
        if self.training and self.cfg.bias_update_rate > 0:
            self.step_counts += tokens_per_expert
        losses = self._losses(logits_TE, scores_TE, indices_TK, tokens_per_expert, seq_len)
        return RoutingResult(indices_TK, weights_TK, None, scores_TE, tokens_per_expert, losses)

    def counted_indices(self, scores_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        """The expert choices the balance losses count: the selection itself, or, with the
        auxiliary-loss-free bias, the unbiased top-k of the scores (DeepSeek-V3 defines f_i on the
        affinities, and Megatron-core counts it so too)."""
        if self.cfg.bias_update_rate > 0:
            _, indices_TK = torch.topk(scores_TE.detach(), self.top_k, dim=-1, sorted=True)
        return indices_TK

    def aux_counts(self, counted_TK: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(per-expert counts [E], choices per token) behind aux_loss's f_i: every assignment, or
        each token's first choice with ``aux_loss_type='top1'`` (Switch, GShard)."""
        if self.cfg.aux_loss_type == "top1":
            counted_TK = counted_TK[:, :1]
        return count_per_expert(counted_TK.flatten(), self.num_experts), counted_TK.shape[1]

    def _losses(self, logits_TE, scores_TE, indices_TK, tokens_per_expert, seq_len):
        cfg = self.cfg
        losses: dict[str, torch.Tensor] = {}
        if not self.training:
            return losses
        counted_TK = self.counted_indices(scores_TE, indices_TK)
        if cfg.aux_loss_coef > 0:
            probs_TE = scores_TE if cfg.type != "sigmoid_topk" else \
                scores_TE / scores_TE.sum(-1, keepdim=True)
            if counted_TK is indices_TK and cfg.aux_loss_type == "assignments":
                counts_E, choices = tokens_per_expert, self.top_k  # already counted
            else:
                counts_E, choices = self.aux_counts(counted_TK)
            losses["aux_loss"] = cfg.aux_loss_coef * balance.switch_aux_loss(probs_TE, counts_E, choices)
        if cfg.seq_aux_loss_coef > 0 and seq_len:
            losses["seq_aux_loss"] = cfg.seq_aux_loss_coef * balance.sequence_aux_loss(
                scores_TE, counted_TK, seq_len)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * balance.z_loss(logits_TE)
        return losses
