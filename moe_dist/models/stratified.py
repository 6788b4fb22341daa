"""Stratified Mixture of Experts (Xu et al., arXiv 2305.02176; ALGORITHMS.md section 5).

The E experts of a layer are split into strata of sizes n_1..n_L (``model.stratified.strata``);
stratum l owns the global ids ``[o_l, o_l + n_l)``. Stratum l has its own gate G_l over the
``E - o_l`` experts of strata l..L (for l = 0 it is the MoELayer's router). Every token keeps a
state s_t, initially 0. Each pass:

1. the stratum to process is the lowest one holding a pending token (s_t < L). The per-stratum
   pending counts go through the injectable ``agree_stratum`` hook -- a MAX all-reduce over the
   expert-parallel group, installed by ``moe_dist.models.arch_parallel`` -- so every rank
   picks the same stratum and runs the same number of all-to-all dispatches (a rank with no
   token at stratum l joins with zero rows), and fixed capacities use the group's largest
   count, so they agree too;
2. the tokens with ``s_t = l`` are normalised (one RMSNorm per stratum), routed by G_l
   (softmax over the visible experts, top-k; with ``model.stratified.second_expert=sampling``
   the second expert is, in training, the Gumbel-perturbed argmax of the others, as in the
   reference), dispatched to the experts and combined;
3. their residual grows: ``z_t <- z_t + MoE_l(norm_l(z_t))``;
4. a token whose top-1 expert lies in stratum j moves to ``s_t = j + 1``: top-1 in the last
   stratum ends its trip, top-1 in the lowest visible stratum earns another pass.

So a token takes 1..L expert passes (its "dynamic capacity"). The layer returns ``z - x`` (the
sum of its passes) for the block's residual. Balance loss per pass over the visible experts:
``(E - o_l)^2 * mean_e(me_e * ce_e)`` (me: mean gate probability, ce: top-1 share), summed over
passes and divided by the number of passes, times ``moe.router.aux_loss_coef``. Capacity with
``moe.capacity.policy=fixed``: ``C = top_k * ceil(capacity_factor * S_l / (E - o_l))`` for the
S_l tokens of the pass (the largest S_l over the ep group; the fairseq rule ``2*ceil(S/E)`` at
factor 1).

The experts are one pool of E :class:`GroupedExperts` (this is a :class:`MoELayer`), so
``apply_ep`` shards them and installs the all-to-all dispatcher unchanged.

Shapes: T tokens, D model dim, E experts, K top_k, S_l tokens in the pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, MoEConfig, StratifiedConfig
from moe_dist.models.arch_base import ArchTransformer
from moe_dist.models.transformer import RMSNorm
from moe_dist.moe import capacity as cap
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.layer import MoELayer

AgreeFn = Callable[[torch.Tensor], torch.Tensor]
"""Pending tokens per stratum [L] -> the same reduced over the ep group (MAX)."""


def gumbel_second_expert(logits_SV: torch.Tensor) -> torch.Tensor:
    """[S, 2] expert indices: the argmax, then the argmax of the logits plus Gumbel(0, 1) noise
    over the other experts (the reference's 'sampling' policy: the second expert is drawn from
    the softmax of the remaining logits)."""
    first = logits_SV.argmax(-1, keepdim=True)
    gumbel = -torch.empty_like(logits_SV).exponential_().log()  # -log(Exp(1)) ~ Gumbel(0, 1)
    second = (logits_SV + gumbel).scatter(-1, first, float("-inf")).argmax(-1, keepdim=True)
    return torch.cat([first, second], dim=-1)


class StratifiedMoELayer(MoELayer):
    """MoE MLP with strata; ``forward(x)`` takes the raw residual stream (it owns its norms)."""

    def __init__(self, dim: int, ffn_dim: int, moe_cfg: MoEConfig, cfg: StratifiedConfig, norm_eps: float) -> None:
        if sum(cfg.strata) != moe_cfg.num_experts:
            raise ConfigError(f"model.stratified.strata {cfg.strata} sum to {sum(cfg.strata)} but moe.num_experts "
                              f"is {moe_cfg.num_experts}; make the stratum sizes add up to the expert count")
        if moe_cfg.router.type != "softmax_topk":
            raise ConfigError(f"model.arch=stratified uses softmax top-k gates per stratum; set "
                              f"moe.router.type=softmax_topk (got {moe_cfg.router.type!r})")
        if moe_cfg.capacity.policy not in ("dropless", "fixed"):
            raise ConfigError(f"model.arch=stratified supports moe.capacity.policy dropless or fixed "
                              f"(got {moe_cfg.capacity.policy!r})")
        if moe_cfg.num_shared_experts:
            raise ConfigError("model.arch=stratified has no shared experts; set moe.num_shared_experts=0")
        super().__init__(dim, ffn_dim, moe_cfg)
        self.strata = list(cfg.strata)
        self.offsets = [sum(self.strata[:l]) for l in range(len(self.strata))]
        self.top_k = moe_cfg.router.top_k
        self.second_expert = cfg.second_expert
        stratum_of_expert = torch.repeat_interleave(  # output_size: also builds on the meta device
            torch.arange(len(self.strata)), torch.tensor(self.strata), output_size=sum(self.strata))
        self.register_buffer("stratum_of_expert", stratum_of_expert, persistent=False)
        # Gate of stratum 0 is self.router (all E experts); strata 1.. see experts o_l..E-1.
        self.upper_gates = nn.ModuleList(nn.Linear(dim, moe_cfg.num_experts - o, bias=False)
                                         for o in self.offsets[1:])
        self.norms = nn.ModuleList(RMSNorm(dim, norm_eps) if l == 0 or cfg.stratum_norm else nn.Identity()
                                   for l in range(len(self.strata)))
        self.agree_stratum: AgreeFn | None = None
        self._visible = moe_cfg.num_experts
        self._pass_tokens = 0  # the agreed token count of the current pass (capacity)
        self.register_buffer("passes_seen", torch.zeros(()), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros(()), persistent=False)

    @property
    def num_strata(self) -> int:
        return len(self.strata)

    def set_stratum_agreement(self, agree: AgreeFn | None) -> None:
        self.agree_stratum = agree

    def gate_weight(self, stratum: int) -> torch.Tensor:
        return self.router.weight if stratum == 0 else self.upper_gates[stratum - 1].weight

    def capacity_for(self, num_tokens: int, top_k: int) -> int | None:
        """Per-expert capacity of the current pass (``None`` when dropless)."""
        policy = self.cfg.capacity
        if policy.policy == "dropless":
            return None
        factor = policy.capacity_factor if self.training else policy.eval_capacity_factor
        tokens = max(num_tokens, self._pass_tokens)
        return max(top_k * math.ceil(factor * tokens / self._visible), 1)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        num_tokens = x_TD.shape[0]
        state_T = torch.zeros(num_tokens, dtype=torch.long, device=x_TD.device)
        acc_TD = torch.zeros_like(x_TD)  # sum of this token's passes so far
        aux_total = x_TD.new_zeros((), dtype=torch.float32)
        passes = 0
        while True:
            stratum, self._pass_tokens, local_rows = self._next_stratum(state_T)
            if stratum >= self.num_strata:
                break
            # The pending tokens in index order, as nonzero() gives them, but sized by the count
            # _next_stratum already read, so the pass costs no second host sync.
            rows = torch.argsort((state_T != stratum).to(torch.int8), stable=True)[:local_rows]
            inp = self.norms[stratum]((x_TD + acc_TD).index_select(0, rows))
            y, top1, aux = self._pass(inp, stratum)
            self._pass_tokens = 0
            acc_TD = acc_TD.index_add(0, rows, y.to(acc_TD.dtype))
            state_T = state_T.index_copy(0, rows, self.stratum_of_expert[top1] + 1)
            aux_total = aux_total + aux
            passes += 1
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            self.stats.tokens += num_tokens
            self.tokens_seen += num_tokens
            coef = self.cfg.router.aux_loss_coef
            if coef > 0 and passes > 0:
                losses["aux_loss"] = coef * aux_total / passes
        return acc_TD.view(shape), losses

    def _next_stratum(self, state_T: torch.Tensor) -> tuple[int, int, int]:
        """(lowest stratum with a pending token anywhere in the group, its largest token count
        over the group, this rank's count), read in one device-to-host sync."""
        local = count_per_expert(state_T, self.num_strata + 1)[:self.num_strata]
        agreed = self.agree_stratum(local) if self.agree_stratum is not None else local
        agreed_counts, local_counts = torch.stack([agreed, local]).tolist()  # NOTE: host sync
        for stratum, count in enumerate(agreed_counts):
            if count > 0:
                return stratum, count, local_counts[stratum]
        return self.num_strata, 0, 0

    def _pass(self, inp_SD: torch.Tensor, stratum: int):
        """One pass of stratum ``stratum`` over its tokens: (output, top-1 global id, unweighted aux)."""
        offset = self.offsets[stratum]
        visible = self.num_experts - offset
        self._visible = visible
        logits = F.linear(inp_SD.float(), self.gate_weight(stratum).float())  # [S, V]
        probs = torch.softmax(logits, dim=-1)
        top_k = min(self.top_k, visible)
        if self.second_expert == "sampling" and self.training and top_k == 2:
            local_idx = gumbel_second_expert(logits.detach())
        else:
            _, local_idx = torch.topk(probs.detach(), top_k, dim=-1, sorted=True)
        weights = probs.gather(1, local_idx)
        if self.cfg.router.normalize_weights and top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        indices = local_idx + offset  # global expert ids
        capacity = self.capacity_for(indices.shape[0], top_k)
        valid = None
        if capacity is not None:
            valid = cap.apply_capacity(indices, None, self.num_experts, capacity)
            weights = torch.where(valid, weights, 0.0)
        expert_in, counts, handle = self.dispatcher.dispatch(inp_SD, indices, valid)
        expert_out = self.experts(expert_in, counts)
        y = self.dispatcher.combine(expert_out, weights, handle)

        num_rows = inp_SD.shape[0]
        top1_counts = count_per_expert(local_idx[:, 0], visible).float()
        aux = visible * (probs.mean(0) * top1_counts / num_rows).sum() if num_rows else probs.sum() * 0.0
        if self.training:
            self._record_pass(indices, valid)
        return y, indices[:, 0], aux

    @torch.no_grad()
    def _record_pass(self, indices: torch.Tensor, valid: torch.Tensor | None) -> None:
        routed = count_per_expert(indices.flatten(), self.num_experts)
        kept_ids = indices if valid is None else torch.where(valid, indices, self.num_experts)
        kept = count_per_expert(kept_ids.flatten(), self.num_experts + 1)[:self.num_experts]
        self.stats.update(routed, kept, 0)
        self.passes_seen += indices.shape[0]

    @torch.no_grad()
    def reset_arch_parameters(self, std: float, out_std: float) -> None:
        for gate in self.upper_gates:
            nn.init.normal_(gate.weight, std=std)

    def mean_passes(self) -> float:
        """Expert passes per token over the training forwards so far (1.0 before any, and for a
        model on the meta device, as a dry run or report builds it)."""
        if self.tokens_seen.is_meta:
            return 1.0
        seen = float(self.tokens_seen)
        return float(self.passes_seen) / seen if seen > 0 else 1.0

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs at the realised mean number of passes (1 before training): the gate of
        stratum 0 plus, per pass, top_k SwiGLU experts. Upper-stratum gates are counted as E wide."""
        passes = self.mean_passes()
        swiglu = 2 * 3 * self.experts.dim * self.expert_ffn_dim
        return {"router": passes * 2.0 * self.experts.dim * self.num_experts,
                "experts": passes * self.top_k * swiglu}


class StratifiedTransformer(ArchTransformer):
    """The MoE blocks (``moe.every``) get a stratified MoE MLP that owns its pre-norms."""

    def install(self) -> None:
        if not self.moe_cfg.enabled:
            raise ConfigError("model.arch=stratified needs MoE blocks: set moe.num_experts > 0 and moe.every >= 1")
        for block in self.layers:
            if block.is_moe:
                block.mlp = StratifiedMoELayer(self.model_cfg.dim, self.model_cfg.ffn_dim, self.moe_cfg,
                                               self.model_cfg.stratified, self.model_cfg.norm_eps)
                block.mlp_norm = nn.Identity()

    def mean_passes(self) -> list[float]:
        return [block.mlp.mean_passes() for block in self.layers if isinstance(block.mlp, StratifiedMoELayer)]
