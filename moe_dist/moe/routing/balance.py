"""Load-balancing losses and the auxiliary-loss-free bias update (pure functions).

Every loss here is unweighted; the router multiplies by its coefficient.
"""

from __future__ import annotations

import torch


def switch_aux_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the share of the T*K assignments that went to expert i (a count, so no
    gradient), ``P_i`` the mean router probability of expert i. It is 1 at perfect balance.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / (num_tokens * top_k)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.dot(f_E, p_E)


def sequence_aux_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, seq_len: int,
                      valid_TK: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the sequences in the batch.

    Per sequence: ``f_i = E/(K*S) * #{t: i selected}``, ``P_i = mean_t s'_{t,i}`` with the
    scores renormalised per token; loss ``sum_i f_i P_i`` (1 at perfect balance). With
    ``valid_TK`` (variable-k routers) only valid slots count and ``K*S`` becomes the number of
    valid assignments of the sequence.
    """
    num_tokens, num_experts = scores_TE.shape
    top_k = indices_TK.shape[1]
    num_seqs = num_tokens // seq_len
    s_BSE = (scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)).view(num_seqs, seq_len, num_experts)
    counts_BE = torch.zeros(num_seqs, num_experts, device=scores_TE.device, dtype=scores_TE.dtype)
    ones = (torch.ones(num_seqs, seq_len * top_k, device=scores_TE.device, dtype=scores_TE.dtype)
            if valid_TK is None else valid_TK.reshape(num_seqs, seq_len * top_k).to(scores_TE.dtype))
    counts_BE.scatter_add_(1, indices_TK.reshape(num_seqs, seq_len * top_k), ones)
    assignments_B1 = ones.sum(1, keepdim=True).clamp_min(1.0)
    f_BE = counts_BE * num_experts / assignments_B1
    p_BE = s_BSE.mean(dim=1)
    return (f_BE * p_BE).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (fp32)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


@torch.no_grad()
def update_selection_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing: ``b_i += u * sign(mean(c) - c_i)``.

    ``tokens_per_expert_E`` must be the count over every rank that shares this router, so
    that the bias stays bit-identical across ranks.
    """
    counts = tokens_per_expert_E.to(bias_E.dtype)
    bias_E += rate * torch.sign(counts.mean() - counts)


@torch.no_grad()
def update_selection_bias_from_stats(model: torch.nn.Module, reduce_fn=None) -> None:
    """After an optimizer step: update every router's selection bias from the step's counts.

    ``reduce_fn`` sums a tensor over every rank that routes different tokens with the same
    router (None in a single process). All routers' counts travel in one reduction. The other
    cross-step routing state (capacity controllers, DynMoE active sets) is updated here too,
    from the same reduction function (:func:`moe_dist.moe.routing_state.update_after_step`).
    """
    routers = [m for m in model.modules()
               if hasattr(m, "step_counts") and getattr(m, "cfg", None) is not None
               and getattr(m.cfg, "bias_update_rate", 0) > 0]
    if routers:
        counts = torch.stack([r.step_counts for r in routers])
        if reduce_fn is not None:
            reduced = reduce_fn(counts)
            counts = counts if reduced is None else reduced
        for router, router_counts in zip(routers, counts):
            update_selection_bias(router.expert_bias, router_counts, router.cfg.bias_update_rate)
            router.step_counts.zero_()
    from moe_dist.moe import routing_state  # controllers and DynMoE (import cycle via router)

    routing_state.update_after_step(model, reduce_fn)
