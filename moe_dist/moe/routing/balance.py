"""Load-balancing losses and the auxiliary-loss-free bias update (pure functions).

Every loss here is unweighted; the router multiplies by its coefficient.

When the tokens of one batch are split over ranks (tensor parallelism routes a slice of every
sequence per rank), ``switch_aux_loss`` and ``sequence_aux_loss`` take the counts and sizes of the
whole batch (``total_tokens``, ``global_counts_BE``/``global_seq_len``) and return this slice's
*share*: the shares of all slices sum to the loss of the whole batch, gradients included.

Shapes: T tokens, E experts, K slots, B sequences of S tokens, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def switch_aux_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, top_k: int,
                    total_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the share of the T*K assignments that went to expert i (a count, so no
    gradient), ``P_i`` the mean router probability of expert i. It is 1 at perfect balance.
    With ``total_tokens`` (and counts over all of them) it is this slice's share.
    """
    num_tokens, num_experts = probs_TE.shape
    if total_tokens is None:
        if num_tokens == 0:
            return probs_TE.sum() * 0.0
        f_E = tokens_per_expert_E.to(probs_TE.dtype) / (num_tokens * top_k)
        return num_experts * torch.dot(f_E, probs_TE.mean(dim=0))
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / (total_tokens * top_k)
    return num_experts * torch.dot(f_E, probs_TE.sum(0) / total_tokens)


def per_sequence_counts(indices_TK: torch.Tensor, num_experts: int, seq_len: int) -> torch.Tensor:
    """[B, E] int64: how often each sequence selected each expert (no host sync)."""
    num_seqs = indices_TK.shape[0] // seq_len
    counts_BE = torch.zeros(num_seqs, num_experts, dtype=torch.int64, device=indices_TK.device)
    flat = indices_TK.reshape(num_seqs, -1)
    return counts_BE.scatter_add_(1, flat, torch.ones_like(flat))


def sequence_aux_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, seq_len: int,
                      valid_TK: torch.Tensor | None = None, *,
                      global_counts_BE: torch.Tensor | None = None,
                      global_seq_len: int | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the sequences in the batch.

    Per sequence: ``f_i = E/(K*S) * #{t: i selected}``, ``P_i = mean_t s'_{t,i}`` with the
    scores renormalised per token; loss ``sum_i f_i P_i`` (1 at perfect balance). With
    ``valid_TK`` (variable-k routers) only valid slots count and ``K*S`` becomes the number of
    valid assignments of the sequence. With ``global_counts_BE`` (selections over the whole
    sequences, of length ``global_seq_len``, of which these ``seq_len`` tokens are a slice) it is
    this slice's share.
    """
    num_tokens, num_experts = scores_TE.shape
    top_k = indices_TK.shape[1]
    num_seqs = num_tokens // seq_len
    s_BSE = (scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)).view(num_seqs, seq_len, num_experts)
    if global_counts_BE is not None:
        assert global_seq_len is not None, "global counts come with the global sequence length"
        f_BE = global_counts_BE.to(scores_TE.dtype) * num_experts / (top_k * global_seq_len)
        return (f_BE * s_BSE.sum(1) / global_seq_len).sum(-1).mean()
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


def diversity_loss(weight_ED: torch.Tensor, active_E: torch.Tensor) -> torch.Tensor:
    """DynMoE diversity: Frobenius norm of the off-identity Gram matrix of the active rows."""
    w_hat = F.normalize(weight_ED.float(), dim=-1)
    mask_EE = (active_E.unsqueeze(0) & active_E.unsqueeze(1)).float()
    eye = torch.eye(weight_ED.shape[0], device=weight_ED.device)
    return torch.linalg.matrix_norm((w_hat @ w_hat.t() - eye) * mask_EE)


def simplicity_loss(weight_ED: torch.Tensor) -> torch.Tensor:
    """DynMoE simplicity: mean L2 norm of the raw gate embeddings (all slots)."""
    return weight_ED.float().norm(dim=-1).mean()


def efficiency_loss(gate_TE: torch.Tensor) -> torch.Tensor:
    """DynMoE efficiency: the mean straight-through gate over tokens and slots (the fraction of
    (token, expert) pairs activated); pushes thresholds up, i.e. towards fewer experts per token."""
    return gate_TE.mean()


def top_any_balance_loss(gate_TE: torch.Tensor, routed_T: torch.Tensor) -> torch.Tensor:
    """DynMoE's load balance over the tokens that activated an expert: ``E * sum_e m_e * c_e``
    with ``m_e`` the mean per-token normalised gate and ``c_e`` the share of those tokens that
    activate e. Masked means keep the shapes fixed (no host sync); 0 when no token is routed."""
    num_experts = gate_TE.shape[1]
    routed_T1 = routed_T.unsqueeze(-1).to(gate_TE.dtype)
    count = routed_T1.sum().clamp_min(1.0)
    m_E = (gate_TE / gate_TE.sum(-1, keepdim=True).clamp_min(1e-20) * routed_T1).sum(0) / count
    c_E = ((gate_TE.detach() > 0).to(gate_TE.dtype) * routed_T1).sum(0) / count
    return num_experts * torch.dot(m_E, c_E)


@torch.no_grad()
def update_selection_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing: ``b_i += u * sign(mean(c) - c_i)``.

    ``tokens_per_expert_E`` must be the count over every rank that shares this router, so
    that the bias stays bit-identical across ranks.
    """
    counts = tokens_per_expert_E.to(bias_E.dtype)
    bias_E += rate * torch.sign(counts.mean() - counts)
