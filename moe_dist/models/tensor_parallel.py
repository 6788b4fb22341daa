"""Tensor parallelism (Megatron-style) with optional sequence parallelism, hand-written on comms.py.

:func:`apply_tp` shards a built :class:`~moe_dist.models.transformer.Transformer` in place over
the tp group. Weights are sliced from the full initialisation every rank built from the same
seed, so a TP run starts from exactly the single-process model. Parameter names and classes
stay the same (``layers.0.attention.wq.weight`` is still an ``nn.Linear`` weight, only smaller);
the collectives sit in forward hooks at the borders of each parallel region.

What is sharded (W = tp size, r = tp rank)::

    tok_embeddings  vocab rows [r*V/W, (r+1)*V/W)            (VocabParallelEmbedding)
    attention       wq/wk/wv rows = heads r*H/W.. (column);  wo columns (row); n_heads = H/W
    dense SwiGLU    w1/w3 rows (column);                     w2 columns (row)
    output head     vocab rows (column); logits all-gathered along the vocab (default) or left
                    sharded for :func:`vocab_parallel_cross_entropy`
    RMSNorm, MoE    not sharded (MoE experts are sharded over ep, see models/expert_parallel.py)

Activations are ``[B, S, D]``; sequence parallelism splits dim 1 (S). With ``sequence_parallel``
the residual stream between regions is the local slice ``[B, S/W, D]``::

    embed:  masked lookup -> reduce-scatter(S)                      -> [B, S/W, D]
    attn:   norm(local) -> all-gather(S) -> wq,wk,wv -> SDPA -> wo -> reduce-scatter(S)
    mlp:    norm(local) -> all-gather(S) -> w1,w3 -> w2          -> reduce-scatter(S)
    moe:    norm(local) -> route this rank's own S/W tokens (ep all-to-all inside) -> [B, S/W, D]
    head:   norm(local) -> all-gather(S) -> output -> all-gather(V) -> logits [B, S, V]

Without sequence parallelism the residual stream is replicated: regions start with an identity
whose backward all-reduces and end with an all-reduce. An MoE layer then keeps only this rank's
S/W slice of its input, routes it, and all-gathers its output, so the tp ranks of one replica
route disjoint tokens in both modes (nothing is computed or counted twice).

Gradient ownership (what distributed/grad_sync.py does after backward, from the tags of
distributed/param_tags.py):

* ``param._tp_sharded = True`` (with ``_tp_shard_dim`` 0 or 1): a shard; its gradient is
  complete. Reduce over dp only; sum its squared norm over tp.
* ``param._tp_partial_grad = True``: replicated over tp but each tp rank saw only its own
  tokens, so the gradient is this rank's part: **sum it over the tp group** (then average over
  dp as usual). Marked: every RMSNorm weight with sequence parallelism; the router and shared
  experts of every MoE layer in both modes.
  ``grad_sync.GradReducer`` does that sum.
* Expert parameters (``GroupedExperts``) get neither mark: tp ranks route disjoint tokens, and the
  sum over edp divided by dp that grad_sync.py already applies covers them (edp spans tp).

Router losses are made exact too: each rank's balancing losses are replaced by its *share* of
the losses over all tokens of the tp group (their sum over tp is the single-process loss, so
the summed router gradient is exact) while the forward *value* is the group total (so the loss
every rank reports equals the single-process loss). See :class:`GroupRouterLosses`.

Worked example, world 4, dp=2, tp=2: tp groups [0,1] [2,3]. Ranks 0 and 1 read the same batch;
rank 0 holds heads 0-1 and vocab rows 0-31 of 64, rank 1 heads 2-3 and rows 32-63; with SP rank
0's residual stream holds positions 0..S/2-1 and only those tokens are routed by rank 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ParallelConfig
from moe_dist.distributed import comms
from moe_dist.distributed.param_tags import is_tp_sharded, mark_tp_partial_grad, mark_tp_shard
from moe_dist.models.transformer import Transformer
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.routing import balance
from moe_dist.moe.routing.result import RoutingResult
from moe_dist.moe.routing.top_k import TopKRouter

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_dist.distributed.mesh import ParallelMesh

SEQ_DIM = 1  # activations are [B, S, D]


# --------------------------------------------------------------------------------------------
# Parameter shards (tagged for distributed/param_tags.py)
# --------------------------------------------------------------------------------------------

def _shard(weight: torch.Tensor, dim: int, rank: int, size: int, what: str) -> nn.Parameter:
    if weight.shape[dim] % size != 0:
        raise ValueError(f"{what}: dim {dim} of size {weight.shape[dim]} does not split over "
                         f"parallel.tp ({size}); choose tp dividing it")
    shard = nn.Parameter(weight.detach().chunk(size, dim=dim)[rank].clone(),
                         requires_grad=weight.requires_grad)
    mark_tp_shard(shard, dim)
    return shard


def _shard_linear(linear: nn.Linear, dim: int, rank: int, size: int, what: str) -> None:
    """dim 0: column parallel (output features split); dim 1: row parallel (input features)."""
    if linear.bias is not None:
        raise ValueError(f"{what}: tensor parallelism here supports bias-free linears only")
    linear.weight = _shard(linear.weight, dim, rank, size, what)
    linear.out_features, linear.in_features = linear.weight.shape


# --------------------------------------------------------------------------------------------
# Region borders (forward hooks; picklable callables rather than lambdas)
# --------------------------------------------------------------------------------------------

class _EnterRegion:
    """Forward pre-hook: make the first input whole for a column-parallel matmul.

    SP: all-gather the sequence (backward reduce-scatters the partial input grads).
    No SP: identity (backward all-reduces them)."""

    def __init__(self, group: ProcessGroup, sequence_parallel: bool) -> None:
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.sequence_parallel:
            x = comms.gather_forward_reduce_scatter_backward(x, SEQ_DIM, self.group)
        else:
            x = comms.all_reduce_backward(x, self.group)
        return (x, *args[1:])


class _ExitRegion:
    """Forward hook: sum the row-parallel partial outputs (SP: reduce-scatter the sequence)."""

    def __init__(self, group: ProcessGroup, sequence_parallel: bool) -> None:
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return comms.reduce_scatter_forward_gather_backward(out, SEQ_DIM, self.group)
        return comms.all_reduce_forward(out, self.group)


class _GatherVocab:
    """Forward hook on the head: all-gather the vocab-sharded logits (backward keeps this rank's
    columns of the gradient, which every rank computes identically from the replicated loss)."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple[Any, ...], logits: torch.Tensor) -> torch.Tensor:
        return comms.gather_forward_split_backward(logits, -1, self.group)


class _SliceTokens:
    """Forward pre-hook on an MoE layer without SP: keep this rank's S/W positions."""

    def __init__(self, group: ProcessGroup, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if x.shape[SEQ_DIM] % self.size != 0:
            raise ValueError(f"sequence length {x.shape[SEQ_DIM]} must be divisible by parallel.tp "
                             f"({self.size}) for an MoE model: each tp rank routes S/tp positions")
        return (comms.split_forward_gather_backward(x, SEQ_DIM, self.group), *args[1:])


class _GatherTokens:
    """Forward hook on an MoE layer without SP: all-gather the routed slices back to [B, S, D]."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple[Any, ...],
                 out: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
        y, losses = out
        return comms.gather_forward_split_backward(y, SEQ_DIM, self.group), losses


# --------------------------------------------------------------------------------------------
# Vocab-parallel embedding and cross-entropy
# --------------------------------------------------------------------------------------------

class VocabParallelEmbedding(nn.Module):
    """Rows ``[vocab_start, vocab_end)`` of a token embedding; the others contribute zeros and the
    partial lookups are summed over tp (SP: reduce-scattered along the sequence)."""

    def __init__(self, full: nn.Embedding, group: ProcessGroup, rank: int, size: int,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.group, self.sequence_parallel = group, sequence_parallel
        per_rank = self.num_embeddings // size
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = _shard(full.weight, 0, rank, size, "model.vocab_size (token embedding)")

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        outside = (tokens_BS < self.vocab_start) | (tokens_BS >= self.vocab_end)
        local = (tokens_BS - self.vocab_start).masked_fill(outside, 0)
        partial_BSD = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comms.reduce_scatter_forward_gather_backward(partial_BSD, SEQ_DIM, self.group)
        return comms.all_reduce_forward(partial_BSD, self.group)

    def extra_repr(self) -> str:
        return f"vocab [{self.vocab_start}, {self.vocab_end}) of {self.num_embeddings}, dim {self.embedding_dim}"


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor,
                                 tp_group: ProcessGroup | None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits sharded along the last dim (this rank holds the contiguous vocab
    block ``tp_rank * V_local ...``), without gathering them: three all-reduces of [..] values
    (max, sum of exp, target logit). Every tp rank returns the same loss; backward gives each
    rank the gradient of its own logit columns. ``tp_group=None`` is plain cross-entropy.

    Call it with ``apply_tp(..., gather_logits=False)``: ``loss = vocab_parallel_cross_entropy(
    out.logits, targets, mesh.tp_group)`` in place of ``F.cross_entropy(out.logits.flatten(0, -2),
    targets.flatten())``. reduction: 'mean' over tokens, 'sum', or 'none' (shape of targets).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction {reduction!r} must be 'mean', 'sum' or 'none'")
    if logits_local.shape[:-1] != targets.shape:
        raise ValueError(f"logits {list(logits_local.shape)} and targets {list(targets.shape)} disagree "
                         "on the leading dims")
    vocab_local = logits_local.shape[-1]
    start = comms.group_rank(tp_group) * vocab_local
    logits = logits_local.float()
    # The shift is a constant for autograd (softmax is shift invariant), so no grad through max.
    shift = comms.all_reduce(logits.detach().amax(-1, keepdim=True), "max", tp_group)
    shifted = logits - shift
    sum_exp = comms.all_reduce_forward(shifted.exp().sum(-1), tp_group)
    local_target = targets - start
    inside = (local_target >= 0) & (local_target < vocab_local)
    picked = shifted.gather(-1, local_target.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = comms.all_reduce_forward(torch.where(inside, picked, 0.0), tp_group)
    loss = sum_exp.log() - target_logit
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


# --------------------------------------------------------------------------------------------
# Router losses over the tp group's tokens
# --------------------------------------------------------------------------------------------

class GroupRouterLosses:
    """Forward hook on a router: turn losses of this rank's token slice into its share of the
    losses over all tokens the tp group routes (the single-process batch).

    For the top-k routers, with global counts ``c`` (one int all-reduce) and T = tokens of the
    group, rank r's share of

    * ``aux_loss``  is ``coef * E * sum_i c_i/(T*K) * sum_{t in r} p_ti / T``;
    * ``seq_aux_loss`` the same per sequence (each sequence is split over the tp ranks);
    * ``z_loss`` (a token mean) is this rank's value times ``T_r / T``.

    Shares sum to the single-process loss, so summing the router's partial gradient over tp is
    exact. Any other loss (other router families) is treated as a token mean and scaled by
    ``T_r / T`` -- exact for token means, an approximation otherwise. The returned value of each
    loss is the group total (one float all-reduce), its gradient that of the share.
    """

    def __init__(self, group: ProcessGroup, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, router: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 result: RoutingResult) -> RoutingResult:
        if not result.losses:  # eval mode: every rank skips the collectives alike
            return result
        seq_len = kwargs.get("seq_len", args[1] if len(args) > 1 else None)
        shares = self._shares(router, result, seq_len)
        result.losses = self._with_group_total(shares)
        return result

    def _shares(self, router: nn.Module, result: RoutingResult, seq_len: int | None) -> dict[str, torch.Tensor]:
        scores_TE = result.scores
        num_tokens, num_experts = scores_TE.shape
        top_k_router = isinstance(router, TopKRouter)
        want_seq = top_k_router and "seq_aux_loss" in result.losses and bool(seq_len)
        counted_TK = router.counted_indices(scores_TE, result.indices) if top_k_router else result.indices
        counts_E, choices = router.aux_counts(counted_TK) if top_k_router else (result.tokens_per_expert, 0)
        stats = [torch.tensor([num_tokens], device=scores_TE.device), counts_E]
        if want_seq:
            stats.append(balance.per_sequence_counts(counted_TK, num_experts, seq_len).flatten())
        stats_global = comms.all_reduce(torch.cat([s.to(torch.int64) for s in stats]), "sum", self.group)
        total_tokens = stats_global[0].to(scores_TE.dtype)
        token_share = num_tokens / total_tokens

        shares = {name: value * token_share for name, value in result.losses.items()}
        if not isinstance(router, TopKRouter):
            return shares
        cfg = router.cfg
        if "aux_loss" in result.losses:
            probs_TE = scores_TE if cfg.type != "sigmoid_topk" else scores_TE / scores_TE.sum(-1, keepdim=True)
            shares["aux_loss"] = cfg.aux_loss_coef * balance.switch_aux_loss(
                probs_TE, stats_global[1:1 + num_experts], choices, total_tokens=total_tokens)
        if want_seq:
            counts_BE = stats_global[1 + num_experts:].view(num_tokens // seq_len, num_experts)
            shares["seq_aux_loss"] = cfg.seq_aux_loss_coef * balance.sequence_aux_loss(
                scores_TE, counted_TK, seq_len, global_counts_BE=counts_BE, global_seq_len=seq_len * self.size)
        return shares

    def _with_group_total(self, shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = sorted(shares)  # same order on every rank
        local = torch.stack([shares[n].detach().float() for n in names])
        total = comms.all_reduce(local.clone(), "sum", self.group)
        return {n: shares[n] + (total[i] - local[i]).to(shares[n].dtype) for i, n in enumerate(names)}


# --------------------------------------------------------------------------------------------
# apply_tp
# --------------------------------------------------------------------------------------------

def apply_tp(model: nn.Module, mesh: ParallelMesh, parallel: ParallelConfig | None = None, *,
             gather_logits: bool = True) -> nn.Module:
    """Shard ``model`` over ``mesh.tp_group`` in place (see the module docstring) and return it.

    ``parallel.sequence_parallel`` selects sequence parallelism (on when ``parallel`` is None).
    Call before building the optimizer and before ``apply_ep`` replaces the dispatchers (the two
    compose: apply_tp never touches experts or dispatchers). tp size 1 returns the model as is.
    ``gather_logits=False`` leaves ``ModelOutput.logits`` sharded along the vocab; the loss must
    then be :func:`vocab_parallel_cross_entropy`.
    """
    sequence_parallel = True if parallel is None else parallel.sequence_parallel
    size, rank, group = mesh.tp_size, mesh.tp_rank, mesh.tp_group
    if size == 1:
        return model
    if not isinstance(model, Transformer):
        raise ValueError(f"parallel.tp ({size}) > 1 supports model.arch='transformer' only, got "
                         f"{type(model).__name__}; use tp=1 for this architecture")
    _check_sizes(model, size)  # before anything is sliced, so a bad size leaves the model whole
    assert group is not None, "tp size > 1 implies a tp group"
    cfg = model.model_cfg

    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group, rank, size, sequence_parallel)
    for block in model.layers:
        attn = block.attention
        for name in ("wq", "wk", "wv"):
            _shard_linear(getattr(attn, name), 0, rank, size, f"layers.{block.layer_idx}.attention.{name}")
        _shard_linear(attn.wo, 1, rank, size, f"layers.{block.layer_idx}.attention.wo")
        attn.n_heads //= size
        _install_region(attn, group, sequence_parallel)
        if isinstance(block.mlp, MoELayer):
            _wrap_moe(block.mlp, group, size, sequence_parallel)
        else:
            what = f"model.ffn_dim (layers.{block.layer_idx}.mlp)"
            _shard_linear(block.mlp.w1, 0, rank, size, what)
            _shard_linear(block.mlp.w3, 0, rank, size, what)
            _shard_linear(block.mlp.w2, 1, rank, size, what)
            _install_region(block.mlp, group, sequence_parallel)

    _shard_linear(model.output, 0, rank, size, "model.vocab_size (output head)")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.output.register_forward_pre_hook(_EnterRegion(group, sequence_parallel))
    if gather_logits:
        model.output.register_forward_hook(_GatherVocab(group))
    _mark_partial_grads(model, sequence_parallel)
    return model


def _check_sizes(model: Transformer, size: int) -> None:
    cfg = model.model_cfg
    dense_ffn = {block.mlp.w1.out_features for block in model.layers if not isinstance(block.mlp, MoELayer)}
    for field, value in (("model.n_heads", cfg.n_heads), ("model.vocab_size", cfg.vocab_size),
                         *(("model.ffn_dim", ffn) for ffn in sorted(dense_ffn))):
        if value % size != 0:
            ok = [d for d in range(1, value + 1) if value % d == 0 and d <= 64]
            raise ValueError(f"{field} ({value}) must be divisible by parallel.tp ({size}); "
                             f"use tp in {ok} or change {field}")


def _install_region(module: nn.Module, group: ProcessGroup, sequence_parallel: bool) -> None:
    module.register_forward_pre_hook(_EnterRegion(group, sequence_parallel))
    module.register_forward_hook(_ExitRegion(group, sequence_parallel))


def _wrap_moe(moe: MoELayer, group: ProcessGroup, size: int, sequence_parallel: bool) -> None:
    moe.router.register_forward_hook(GroupRouterLosses(group, size), with_kwargs=True)
    if not sequence_parallel:
        moe.register_forward_pre_hook(_SliceTokens(group, size))
        moe.register_forward_hook(_GatherTokens(group))


def _mark_partial_grads(model: Transformer, sequence_parallel: bool) -> None:
    moe_params = {id(p) for _, moe in model.moe_layers() for p in moe.parameters()}
    expert_params = {id(p) for _, moe in model.moe_layers() for p in moe.experts.parameters()}
    for param in model.parameters():
        if is_tp_sharded(param) or id(param) in expert_params:
            continue
        if sequence_parallel or id(param) in moe_params:
            mark_tp_partial_grad(param)
