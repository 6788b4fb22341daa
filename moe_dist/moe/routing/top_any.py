"""DynMoE top-any gating (Guo et al. 2024, "Dynamic Mixture of Experts"), router type 'top_any'.

Each expert e has a trainable gate embedding ``w_e`` (a row of ``weight``, orthogonal init) and
a trainable threshold ``G_e`` (init 0). With ``tau = moe.router.top_any_tau``:

1. ``z_te = sigmoid(tau * cos(x_t, w_e)) * active_e`` (inactive slots score 0);
2. ``g_te = relu(z_te - sigmoid(tau * G_e))``; expert e is activated iff ``g_te > 0``, i.e. iff
   ``cos(x_t, w_e) > G_e`` (independent of tau);
3. the gate is ``sign(g)`` forward and the identity backward (straight-through estimator), so
   only activated experts pass gradient into ``w`` and ``G`` (through the relu);
4. combine weights ``gate / K_t``: the uniform average of the ``K_t`` activated experts;
5. in training, a token that activates no expert gets a zero MoE output and is recorded as
   unrouted (it drives expert addition); at evaluation it goes to its closest active expert
   (largest cosine) with weight 1. ``moe.router.top_any_train_fallback`` applies that fallback in
   training too; fallback routings never count as routings for pruning.

As in the reference (LINs-lab/DynMoE, DeepSpeed ``GAMoEGateT`` / ``topanygating_opt``): no cap on
the experts per token unless ``moe.router.top_any_max_k`` asks for one (then the largest margins
``cos - G`` are kept); the temperature is fixed (the reference's is not trainable either).

Losses (each logged apart): diversity ``|| (W^ W^T) * M - I * M ||_F`` over active rows of the
row-normalised ``W^``, simplicity ``mean_e ||w_e||`` and efficiency ``mean(gate)`` (weighted by
``top_any_reg_coef``), and the load balance ``E * sum_e m_e c_e`` over the routed tokens
(``aux_loss_coef``; :func:`~moe_dist.moe.routing.balance.top_any_balance_loss`). The reference
sums the four under one coefficient; moe_dist keeps its two. No z-loss (no softmax logits).

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
        self.max_k = min(cfg.top_any_max_k or num_experts, num_experts)
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
        weights_TK = torch.where(fired_TK, gate_TE.gather(1, indices_TK) / k_T.clamp_min(1).unsqueeze(-1), 0.0)
        unrouted_T = k_T == 0
        fired_counts = count_per_expert(torch.where(fired_TK, indices_TK, self.num_experts).flatten(),
                                        self.num_experts + 1)[:self.num_experts]  # no host sync
        valid_TK = fired_TK
        if not self.training or self.cfg.top_any_train_fallback:
            # A token that activated nothing goes to its closest active expert (largest cosine, as
            # DynMoE's argmax of the scores) in slot 0, with weight 1 and no gate gradient.
            closest_T = cos_TE.detach().masked_fill(~active_E, float("-inf")).argmax(-1)
            fallback_TK = torch.zeros_like(fired_TK)
            fallback_TK[:, 0] = unrouted_T
            indices_TK = torch.where(fallback_TK, closest_T.unsqueeze(-1), indices_TK)
            weights_TK = torch.where(fallback_TK, 1.0, weights_TK)
            valid_TK = fired_TK | fallback_TK
        tokens_per_expert = count_per_expert(torch.where(valid_TK, indices_TK, self.num_experts).flatten(),
                                             self.num_experts + 1)[:self.num_experts]
        if self.training:
            self._record(x_float, k_T, unrouted_T, fired_counts)
        losses = self._losses(gate_TE, unrouted_T)
        return RoutingResult(indices_TK, weights_TK, valid_TK, z_TE, tokens_per_expert, losses)

    @torch.no_grad()
    def _record(self, x_TD: torch.Tensor, k_T: torch.Tensor, unrouted_T: torch.Tensor,
                fired_counts: torch.Tensor) -> None:
        """Realised k, and DynMoE's records: activations only, never fallback routings."""
        self.k_hist += count_per_expert(k_T, self.max_k + 1).to(self.k_hist.dtype)
        if self.recording:
            self.record_counts += fired_counts.to(self.record_counts.dtype)
            self.record_unrouted_sum += (x_TD * unrouted_T.unsqueeze(-1)).sum(0)
            self.record_unrouted += unrouted_T.sum()

    def _losses(self, gate_TE: torch.Tensor, unrouted_T: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        losses: dict[str, torch.Tensor] = {}
        if not self.training:
            return losses
        if cfg.top_any_reg_coef > 0:
            losses["diversity_loss"] = cfg.top_any_reg_coef * balance.diversity_loss(self.weight, self.active)
            losses["simplicity_loss"] = cfg.top_any_reg_coef * balance.simplicity_loss(self.weight)
            losses["efficiency_loss"] = cfg.top_any_reg_coef * balance.efficiency_loss(gate_TE)
        if cfg.aux_loss_coef > 0 and gate_TE.shape[0] > 0:
            losses["aux_loss"] = cfg.aux_loss_coef * balance.top_any_balance_loss(gate_TE, ~unrouted_T)
        return losses
