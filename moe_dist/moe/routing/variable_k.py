"""Variable-k and expert-choice gates: 'expert_choice', 'top_p', 'xmoe', 'da_moe' ('top_any' is
in :mod:`moe_dist.moe.router_top_any`).

Every gate returns the :class:`~moe_dist.moe.router.RoutingResult` contract with ``K = Kmax``
slots per token and a ``valid`` mask marking the slots really used:

- 'top_p', 'xmoe', 'da_moe': ``Kmax = min(moe.router.top_k, E)``: ``top_k`` is the *cap* on the
  experts one token may activate (set ``top_k = num_experts`` for the uncapped papers);
- 'expert_choice': ``Kmax = E`` (slot e is expert e; valid when expert e picked the token).

The dispatchers send only valid slots, so fewer activated experts means fewer dispatched rows
and fewer expert FLOPs. ``tokens_per_expert`` counts valid slots. Routing math runs in fp32.

Shapes: T tokens, D hidden, E experts, K = Kmax slots, B sequences of S tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, RouterConfig
from moe_dist.moe import balance
from moe_dist.moe.router import RoutingResult


def build(dim: int, num_experts: int, cfg: RouterConfig) -> nn.Module:
    """The non-top-k router named by ``cfg.type``."""
    routers = {"expert_choice": ExpertChoiceRouter, "top_p": TopPRouter, "xmoe": XMoERouter,
               "da_moe": DAMoERouter}
    if cfg.type == "top_any":
        from moe_dist.moe.router_top_any import TopAnyRouter

        return TopAnyRouter(dim, num_experts, cfg)
    if cfg.type not in routers:
        valid = ["softmax_topk", "sigmoid_topk", *routers, "top_any"]
        raise ConfigError(f"moe.router.type ({cfg.type!r}) is not a router; use one of {valid}")
    return routers[cfg.type](dim, num_experts, cfg)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

def variable_k_aux_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch loss ``E * sum_i f_i P_i`` with ``f_i`` the share of the *valid* assignments that
    went to expert i (1 at perfect balance, whatever the per-token k)."""
    num_experts = probs_TE.shape[1]
    total = tokens_per_expert_E.sum().clamp_min(1).to(probs_TE.dtype)
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / total
    return num_experts * torch.dot(f_E, probs_TE.mean(dim=0))


def entropy_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token router entropy ``-sum_e p log p`` (Huang et al.'s dynamic loss)."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()


def exclusive_cumsum(x_TE: torch.Tensor) -> torch.Tensor:
    """``out[:, r] = sum_{r' < r} x[:, r']`` (0 for the first column)."""
    return torch.cat([x_TE.new_zeros(x_TE.shape[0], 1), torch.cumsum(x_TE[:, :-1], dim=-1)], dim=-1)


class SoftmaxGate(nn.Module):
    """Linear softmax gate shared by the routers of this module.

    Buffers: ``expert_bias`` / ``step_counts`` (auxiliary-loss-free selection bias, updated by
    :func:`moe_dist.moe.balance.update_selection_bias_from_stats`, exactly as for
    :class:`~moe_dist.moe.router.TopKRouter`) and ``k_hist`` (experts-per-token histogram of the
    current logging window, bins 0..Kmax; read and reset by
    :func:`moe_dist.moe.routing_state.routing_metrics`).
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
        tokens_per_expert = torch.bincount(experts_N, minlength=self.num_experts + 1)[:self.num_experts]
        if self.training:
            with torch.no_grad():
                k_T = valid_TK.sum(-1)
                self.k_hist += torch.bincount(k_T, minlength=self.max_k + 1)[:self.max_k + 1].to(self.k_hist.dtype)
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
            losses["aux_loss"] = cfg.aux_loss_coef * variable_k_aux_loss(probs_TE, tokens_per_expert)
        if balance_losses and cfg.seq_aux_loss_coef > 0 and seq_len:
            losses["seq_aux_loss"] = cfg.seq_aux_loss_coef * balance.sequence_aux_loss(
                probs_TE, indices_TK, seq_len, valid_TK)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * balance.z_loss(logits_TE)
        if cfg.entropy_loss_coef > 0:
            losses["entropy_loss"] = cfg.entropy_loss_coef * entropy_loss(probs_TE)
        return losses


# --------------------------------------------------------------------------------------------
# Cumulative-probability routers
# --------------------------------------------------------------------------------------------

class CumulativeProbRouter(SoftmaxGate):
    """Sort each token's probabilities, keep a prefix by a cumulative-probability rule, cap it
    at ``Kmax = min(top_k, E)``. The top-1 expert is always kept. Combine weights are the raw
    probabilities (not renormalised, as in both papers), so the output scale grows with k.

    With a loss-free bias the experts are *ordered* by ``p + b`` and the cumulative sum runs
    over the unbiased ``p`` in that order.
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, cfg, max_k=min(cfg.top_k, num_experts))

    def keep_sorted(self, sorted_probs_TE: torch.Tensor) -> torch.Tensor:
        """[T, E] bool: which ranks of the sorted probabilities to keep (before the cap)."""
        raise NotImplementedError  # the two subclasses define the rule

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        order_TE = torch.sort(self.selection_scores(probs_TE), dim=-1, descending=True, stable=True).indices
        sorted_probs_TE = probs_TE.gather(1, order_TE)
        keep_TE = self.keep_sorted(sorted_probs_TE.detach())
        keep_TE[:, 0] = True
        indices_TK = order_TE[:, :self.max_k]
        return self.finish(indices_TK, sorted_probs_TE[:, :self.max_k], keep_TE[:, :self.max_k],
                           probs_TE, logits_TE, seq_len)


class TopPRouter(CumulativeProbRouter):
    """Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"): keep the smallest
    prefix whose *inclusive* cumulative probability exceeds ``top_p``, i.e. rank r is kept iff
    the probability mass ranked before it is ``<= top_p``.

    Example: p = [.5, .3, .15, .05], top_p = 0.4 -> 1 expert; uniform over 16 experts -> 7.
    """

    def keep_sorted(self, sorted_probs_TE: torch.Tensor) -> torch.Tensor:
        return exclusive_cumsum(sorted_probs_TE) <= self.cfg.top_p


class XMoERouter(CumulativeProbRouter):
    """XMoE threshold routing (Yang et al. 2024): rank r is kept iff the *exclusive* cumulative
    probability before it is ``< xmoe_threshold``.

    Example: p = [.5, .3, .15, .05], t = 0.9 -> 3 experts; uniform over 64 experts -> 58.
    """

    def keep_sorted(self, sorted_probs_TE: torch.Tensor) -> torch.Tensor:
        return exclusive_cumsum(sorted_probs_TE) < self.cfg.xmoe_threshold


# --------------------------------------------------------------------------------------------
# DA-MoE
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def attention_importance(x_TD: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """[T] importance in (0, 1]: attention each token *receives*, from a parameter-free proxy.

    Steps, per sequence of S tokens (the whole batch is one sequence when ``seq_len`` is None):

    1. proxy causal attention ``A = softmax(x x^T / sqrt(D) + causal mask)`` over the layer's
       (normalised) input -- one head of width D, no learned projections, no gradient;
    2. received attention ``r_j = sum_{i >= j} A[i, j]``;
    3. remove the causal bias: under a *uniform* causal attention token j would receive
       ``u_j = sum_{i >= j} 1/(i+1)``; use ``r_j / u_j`` (1 everywhere for uniform attention);
    4. normalise by the sequence maximum.

    This is a proxy: the real model's attention probabilities are not available from fused
    SDPA kernels. ``r_j`` depends on later tokens, so the k of a token sees its future.
    """
    num_tokens, dim = x_TD.shape
    seq = seq_len or num_tokens
    x_BSD = x_TD.float().view(num_tokens // seq, seq, dim)
    scores_BSS = torch.einsum("bid,bjd->bij", x_BSD, x_BSD) / math.sqrt(dim)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x_TD.device).tril()
    attn_BSS = torch.softmax(scores_BSS.masked_fill(~causal, float("-inf")), dim=-1)
    received_BS = attn_BSS.sum(dim=1)
    uniform_S = (1.0 / torch.arange(1, seq + 1, device=x_TD.device, dtype=torch.float32)).flip(0).cumsum(0).flip(0)
    ratio_BS = received_BS / uniform_S
    return (ratio_BS / ratio_BS.amax(dim=-1, keepdim=True)).reshape(num_tokens)


def k_from_importance(importance_T: torch.Tensor, max_k: int) -> torch.Tensor:
    """``K_t = clip(ceil(I_t * Kmax), 1, Kmax)`` (int64)."""
    return torch.ceil(importance_T * max_k).clamp(1, max_k).long()


class DAMoERouter(SoftmaxGate):
    """DA-MoE (Akhavan Aghdam et al. 2024): token t uses the top-``K_t`` experts of the softmax
    gate, ``K_t = clip(ceil(I_t * Kmax), 1, Kmax)`` with ``I_t`` the normalised attention the
    token receives; ``Kmax = min(top_k, E)``. Selected gates are renormalised when
    ``normalize_weights``.

    ``forward(x, seq_len, importance_T=None)``: a caller holding real attention probabilities
    can pass ``importance_T`` ([T] in (0, 1]); otherwise :func:`attention_importance` computes
    the parameter-free proxy from the router input (what :class:`MoELayer` uses).
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, cfg, max_k=min(cfg.top_k, num_experts))

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None,
                importance_T: torch.Tensor | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if importance_T is None:
            importance_T = attention_importance(x_TD, seq_len)
        k_T = k_from_importance(importance_T.to(probs_TE.device), self.max_k)
        _, indices_TK = torch.topk(self.selection_scores(probs_TE), self.max_k, dim=-1, sorted=True)
        valid_TK = torch.arange(self.max_k, device=x_TD.device) < k_T.unsqueeze(-1)
        weights_TK = probs_TE.gather(1, indices_TK) * valid_TK
        if self.cfg.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        return self.finish(indices_TK, weights_TK, valid_TK, probs_TE, logits_TE, seq_len)


# --------------------------------------------------------------------------------------------
# Expert choice
# --------------------------------------------------------------------------------------------

class ExpertChoiceRouter(SoftmaxGate):
    """Expert choice (Zhou et al. 2022): each expert takes its top ``ceil(T * c / E)`` tokens
    (at most T) by softmax score, ``c = expert_choice_capacity``. ``Kmax = E``: slot e is expert
    e, valid when e picked the token; weight = the token's softmax probability for e.

    Non-causal: the token pool is this rank's whole micro-batch, so whether a token is picked
    depends on later tokens of its sequence (invalid for autoregressive decoding). Balanced by
    construction, so the aux and sequence losses are not applied (the z-loss is). A token may
    get no expert (it then passes only through the residual).
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, cfg, max_k=num_experts)

    def tokens_per_expert_for(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(num_tokens * self.cfg.expert_choice_capacity / self.num_experts))

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        num_tokens = x_TD.shape[0]
        per_expert = self.tokens_per_expert_for(num_tokens)
        _, tokens_EC = torch.topk(probs_TE.detach().t(), per_expert, dim=-1, sorted=True)  # [E, C]
        chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        experts_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(1).expand_as(tokens_EC)
        chosen_TE[tokens_EC, experts_EC] = True
        indices_TE = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        return self.finish(indices_TE, probs_TE, chosen_TE, probs_TE, logits_TE, seq_len,
                           balance_losses=False)
