"""Expert choice routing (Zhou et al. 2022): experts pick tokens instead of tokens picking experts.

Shapes: T tokens, D hidden, E experts, K = E slots (slot e is expert e), C tokens per expert.
"""

from __future__ import annotations

import math

import torch

from moe_dist.config import RouterConfig
from moe_dist.moe.routing.result import RoutingResult
from moe_dist.moe.routing.softmax_gate import SoftmaxGate


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
        # chosen[tokens_EC[e, c], e] = True. A scatter of a scalar, not ``chosen[idx, idx] = True``:
        # that index_put copies the value from the host, which syncs on CUDA.
        chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, tokens_EC.t(), True)
        indices_TE = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        return self.finish(indices_TE, probs_TE, chosen_TE, probs_TE, logits_TE, seq_len,
                           balance_losses=False)
