"""Variable-k gates: 'top_p', 'xmoe', 'da_moe' ('top_any' is in :mod:`.top_any`).

Every gate returns the :class:`~moe_dist.moe.routing.result.RoutingResult` contract with
``K = Kmax = min(moe.router.top_k, E)`` slots per token and a ``valid`` mask marking the slots
really used: ``top_k`` is the *cap* on the experts one token may activate (set
``top_k = num_experts`` for the uncapped papers).

The dispatchers send only valid slots, so fewer activated experts means fewer dispatched rows
and fewer expert FLOPs. ``tokens_per_expert`` counts valid slots. Routing math runs in fp32.

Shapes: T tokens, D hidden, E experts, K = Kmax slots, B sequences of S tokens.
"""

from __future__ import annotations

import math

import torch

from moe_dist.config import RouterConfig
from moe_dist.moe.routing.result import RoutingResult
from moe_dist.moe.routing.softmax_gate import SoftmaxGate, exclusive_cumsum


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
def causal_importance(q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[B, S] importance in (0, 1] of every token from causal attention ``softmax(q k^T / sqrt(d))``,
    using no position after the token itself. DA-MoE's statistic, made causal:

    1. the paper's importance of token j is the attention it *receives*, ``sum_i A[i, j]``; in a
       causal LM the queries ``i > j`` are j's future, so only ``A[j, j]`` remains: the weight
       token j's attention keeps on itself, averaged over heads;
    2. remove the causal bias: under uniform causal attention ``A[j, j] = 1/(j+1)``, so use
       ``r_j = (j+1) * A[j, j]`` (1 everywhere for uniform attention);
    3. normalise causally: the paper divides by the sequence maximum, which sees the future;
       here ``I_j`` is the share of ``r_1..r_j`` that are <= ``r_j`` (its percentile among the
       positions seen so far), so ``I_j`` is in (0, 1] and independent of later tokens.

    ``A[j, j] = exp(q_j.k_j / sqrt(d) - lse_j)`` with the row log-sum-exp computed ``chunk``
    query rows at a time: memory ``O(chunk * S)`` per head, never the full S x S matrix (fused
    SDPA kernels do not return probabilities). No gradient flows (K_t is discrete).
    """
    _, _, seq, head_dim = q_BHSd.shape
    q, k = q_BHSd.float(), k_BHSd.float()
    scale = 1.0 / math.sqrt(head_dim)
    positions = torch.arange(seq, device=q.device)
    self_score_BHS = (q * k).sum(-1) * scale
    lse_BHS = torch.empty_like(self_score_BHS)
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        scores = torch.einsum("bhid,bhjd->bhij", q[:, :, start:stop], k[:, :, :stop]) * scale
        future = positions[:stop].unsqueeze(0) > positions[start:stop].unsqueeze(1)
        lse_BHS[:, :, start:stop] = torch.logsumexp(scores.masked_fill(future, float("-inf")), dim=-1)
    retained_BS = torch.exp(self_score_BHS - lse_BHS).mean(1) * (positions + 1)
    return causal_percentile(retained_BS, chunk)


def causal_percentile(values_BS: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``out[b, j] = #{i <= j: values[b, i] <= values[b, j]} / (j + 1)``, in (0, 1]. Values within
    a relative 1e-5 count as equal, so rounding noise does not order ties (uniform attention gives
    1 everywhere)."""
    seq = values_BS.shape[-1]
    positions = torch.arange(seq, device=values_BS.device)
    out = torch.empty_like(values_BS, dtype=torch.float32)
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        bound = values_BS[:, start:stop] * (1 + 1e-5)
        at_most = values_BS[:, :stop].unsqueeze(1) <= bound.unsqueeze(2)  # [B, rows, cols]
        seen = positions[:stop].unsqueeze(0) <= positions[start:stop].unsqueeze(1)
        out[:, start:stop] = (at_most & seen).sum(-1) / (positions[start:stop] + 1)
    return out


@torch.no_grad()
def attention_importance(x_TD: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """[T] :func:`causal_importance` of a parameter-free proxy attention over the router input
    (one head, ``q = k = x``), for a DA-MoE router used without the block's attention (the
    transformer blocks hand the router their real attention's statistic instead). The proxy's
    self-score dominates, so most tokens get a large K: a fallback, not the paper's signal."""
    num_tokens, dim = x_TD.shape
    seq = seq_len or num_tokens
    x_B1SD = x_TD.float().view(num_tokens // seq, 1, seq, dim)
    return causal_importance(x_B1SD, x_B1SD).reshape(num_tokens)


def k_from_importance(importance_T: torch.Tensor, max_k: int) -> torch.Tensor:
    """``K_t = clip(ceil(I_t * Kmax), 1, Kmax)`` (int64)."""
    return torch.ceil(importance_T * max_k).clamp(1, max_k).long()


class DAMoERouter(SoftmaxGate):
    """DA-MoE (Akhavan Aghdam et al. 2024): token t uses the top-``K_t`` experts of the softmax
    gate, ``K_t = clip(ceil(I_t * Kmax), 1, Kmax)`` with ``I_t`` the token's importance from the
    attention of its own block (:func:`causal_importance`); ``Kmax = min(top_k, E)``. Selected
    gates are renormalised when ``normalize_weights``.

    ``forward(x, seq_len, importance_T=None)``: the transformer block passes its attention's
    ``importance_T`` ([T] in (0, 1]) through the MoE layer; without it the router falls back to
    :func:`attention_importance`, a proxy from its own input.
    """

    uses_token_importance = True
    """Tells the MoE layer and the block to hand over the attention's importance."""

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
