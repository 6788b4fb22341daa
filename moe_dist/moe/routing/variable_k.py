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
