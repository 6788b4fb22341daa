"""DynMoE top-any gating (Guo et al. 2024, "Dynamic Mixture of Experts"), router type 'top_any'.

Each expert e has a trainable gate embedding ``w_e`` (a row of ``weight``, orthogonal init) and
a trainable threshold ``G_e`` (init 0). With ``tau = moe.router.top_any_tau``:

1. ``z_te = sigmoid(tau * cos(x_t, w_e)) * active_e`` (inactive slots score 0);
2. ``g_te = relu(z_te - sigmoid(tau * G_e))``; expert e is activated iff ``g_te > 0``, i.e. iff
   ``cos(x_t, w_e) > G_e`` (independent of tau);
3. the gate is ``sign(g)`` forward and the identity backward (straight-through estimator), so
   only activated experts pass gradient into ``w`` and ``G`` (through the relu);
4. combine weights ``gate / K_t``: the uniform average of the ``K_t`` activated experts.

Deviations, chosen for the dispatch contract and documented in docs/routing.md:

- ``Kmax = min(moe.router.top_k, E)`` slots; when more experts fire, those with the largest
  margin ``cos - G`` are kept (set top_k = num_experts for the uncapped algorithm);
- a token that activates none falls back to its largest-margin active expert with weight 1
  (training and eval; DynMoE does this at eval only). The fallback carries no gradient into the
  gate, and the token still counts as "unrouted" for expert growth.

Losses (each logged apart, weighted by ``top_any_reg_coef``): diversity
``|| (W^ W^T) * M - I * M ||_F`` over active rows of the row-normalised ``W^`` and simplicity
``mean_e ||w_e||``; plus the variable-k Switch loss (``aux_loss_coef``) over the per-token
normalised scores. The z-loss does not apply (there are no softmax logits).

Shapes: T tokens, D hidden, E expert slots, K = Kmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, RouterConfig
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.routing import balance
from moe_dist.moe.routing.result import RoutingResult


class TopAnyRouter(nn.Module):
    """DynMoE top-any gate over a pool of ``num_experts`` slots (see the module docstring).

    Buffers (all saved in checkpoints except ``k_hist``):

    - ``active`` [E] bool: the active slots (the first ``adaptive.initial_experts``, or all);
    - DynMoE growth/pruning records, changed only by :mod:`moe_dist.moe.routing.adaptive`:
      ``record_counts`` [E] (tokens each slot received in the record window),
      ``record_unrouted_sum`` [D] and ``record_unrouted`` (sum and number of tokens that
      activated no expert), ``idle_windows`` [E] and ``adaptive_step`` (optimizer steps seen);
    - ``k_hist`` [Kmax+1]: experts activated per token before the fallback (bin 0 = unrouted).
    """

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig) -> None:
        super().__init__()
        adaptive = cfg.adaptive
        initial = adaptive.initial_experts or num_experts
        if initial > num_experts:
            raise ConfigError(f"moe.router.adaptive.initial_experts ({initial}) exceeds the slot pool "
                              f"moe.num_experts ({num_experts}); raise num_experts")
        self.cfg = cfg
        self.num_experts = num_experts
        self.max_k = min(cfg.top_k, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.threshold = nn.Parameter(torch.zeros(num_experts))
        self.register_buffer("active", torch.arange(num_experts) < initial)
        self.register_buffer("record_counts", torch.zeros(num_experts))
        self.register_buffer("record_unrouted_sum", torch.zeros(dim))
        self.register_buffer("record_unrouted", torch.zeros(()))
        self.register_buffer("idle_windows", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("adaptive_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("k_hist", torch.zeros(self.max_k + 1), persistent=False)
        self._host_step: int | None = 0
        """Host copy of ``adaptive_step`` (decides whether this step records without a sync)."""
        self.pending_resets: list[int] = []
        """Slots switched on or off by the last adaptive update, whose optimizer state the
        trainer resets (:func:`moe_dist.moe.routing.adaptive.reset_pending_optimizer_state`)."""
        self.register_load_state_dict_post_hook(TopAnyRouter._forget_host_step)
        self.reset_parameters()

    @staticmethod
    def _forget_host_step(module: nn.Module, _incompatible) -> None:
        module._host_step = None

    @property
    def host_step(self) -> int:
        if self._host_step is None:
            self._host_step = int(self.adaptive_step)  # NOTE: device-to-host sync (once after a load)
        return self._host_step

    def reset_parameters(self, std: float = 0.02) -> None:
        """Orthogonal gate embeddings (DynMoE); ``std`` is unused and kept for the common API."""
        del std
        nn.init.orthogonal_(self.weight)
        with torch.no_grad():
            self.threshold.zero_()

    @property
    def recording(self) -> bool:
        """Whether the current step falls in the record phase of the adaptive schedule."""
        adaptive = self.cfg.adaptive
        if not (adaptive.enabled and self.training):
            return False
        if adaptive.record_steps == 0:
            return True
        return self.host_step % adaptive.update_every >= adaptive.update_every - adaptive.record_steps

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RoutingResult:
        tau = self.cfg.top_any_tau
        x_float = x_TD.float()
        cos_TE = F.normalize(x_float, dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        active_E = self.active
        z_TE = torch.sigmoid(tau * cos_TE) * active_E
        g_TE = F.relu(z_TE - torch.sigmoid(tau * self.threshold.float()))
        gate_TE = g_TE + (torch.sign(g_TE) - g_TE).detach()  # straight-through sign

        margin_TE = (cos_TE - self.threshold.float()).detach().masked_fill(~active_E, float("-inf"))
        _, indices_TK = torch.topk(margin_TE, self.max_k, dim=-1, sorted=True)
        fired_TK = g_TE.detach().gather(1, indices_TK) > 0
        k_T = fired_TK.sum(-1)
        weights_TK = gate_TE.gather(1, indices_TK) / k_T.clamp_min(1).unsqueeze(-1)
        # Fallback: a token that activated nothing goes to its best active expert with weight 1.
        unrouted_T = k_T == 0
        first_slot_TK = torch.zeros_like(fired_TK)
        first_slot_TK[:, 0] = True
        fallback_TK = first_slot_TK & unrouted_T.unsqueeze(-1)
        valid_TK = fired_TK | fallback_TK
        weights_TK = torch.where(fallback_TK, 1.0, torch.where(valid_TK, weights_TK, 0.0))

        experts_N = torch.where(valid_TK, indices_TK, self.num_experts).flatten()
        tokens_per_expert = count_per_expert(experts_N, self.num_experts + 1)[:self.num_experts]  # no host sync
        if self.training:
            self._record(x_float, k_T, unrouted_T, tokens_per_expert)
        losses = self._losses(z_TE, tokens_per_expert, unrouted_T)
        return RoutingResult(indices_TK, weights_TK, valid_TK, z_TE, tokens_per_expert, losses)

    @torch.no_grad()
    def _record(self, x_TD: torch.Tensor, k_T: torch.Tensor, unrouted_T: torch.Tensor,
                tokens_per_expert: torch.Tensor) -> None:
        self.k_hist += count_per_expert(k_T, self.max_k + 1).to(self.k_hist.dtype)
        if self.recording:
            self.record_counts += tokens_per_expert.to(self.record_counts.dtype)
            self.record_unrouted_sum += (x_TD * unrouted_T.unsqueeze(-1)).sum(0)
            self.record_unrouted += unrouted_T.sum()

    def _losses(self, z_TE: torch.Tensor, tokens_per_expert: torch.Tensor,
                unrouted_T: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        losses: dict[str, torch.Tensor] = {}
        if not self.training:
            return losses
        if cfg.top_any_reg_coef > 0:
            losses["diversity_loss"] = cfg.top_any_reg_coef * balance.diversity_loss(self.weight, self.active)
            losses["simplicity_loss"] = cfg.top_any_reg_coef * balance.simplicity_loss(self.weight)
        if cfg.aux_loss_coef > 0 and z_TE.shape[0] > 0:
            # Switch loss over the tokens that activated an expert (DeepSpeed DynMoE), with the
            # scores normalised per token; masked means avoid a data-dependent shape.
            routed_T1 = (~unrouted_T).unsqueeze(-1).float()
            probs_TE = z_TE / z_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            p_E = (probs_TE * routed_T1).sum(0) / routed_T1.sum().clamp_min(1.0)
            losses["aux_loss"] = cfg.aux_loss_coef * balance.variable_k_aux_loss(p_E.unsqueeze(0), tokens_per_expert)
        return losses
