"""How a parallelized model tells the generic layer what each parameter is.

The models' parallelize code (``models/tensor_parallel.py``, ``models/expert_parallel.py``,
``models/peer_parallel.py``) tags parameters as it shards them; gradient reduction, norm
clipping and checkpoints (this package) read only the tags, never the model classes:

* **expert shard** (:func:`mark_expert_param`): rows ``[offset, offset + rows)`` of a tensor
  whose dim 0 is split in equal contiguous blocks over the ep group. Reduced over edp, norm
  summed over ep, written to checkpoints as block ``ep_rank`` of dim 0.
* **etp shard** (:func:`mark_etp_shard`): an expert shard whose dim ``d`` is also split over the
  etp group (expert tensor parallelism). Dim ``d`` is ``parts`` equal fused parts (w13's gate and
  up halves: 2; w2: 1), and each part is split in ``etp`` contiguous blocks: etp rank r holds
  block r of every part, concatenated (:func:`etp_blocks`, :func:`take_etp_shard`). Reduced over
  edp like any expert, norm summed over ep and etp, written to checkpoints as one box per part.
* **whole expert** (:func:`mark_whole_expert`): an expert parameter that is one expert's whole
  tensor under its single-process name, held by one ep rank only (HMoE's width-placed experts,
  ``models/hmoe_parallel.py``). Reduced over edp, norm summed over ep, written to checkpoints as a
  plain tensor by its owner, so the saved layout does not depend on ep.
* **tp shard** (``_tp_sharded`` + ``_tp_shard_dim``): split over the tp group along one dim;
  reduced over dp only, norm summed over tp.
* **tp partial gradient** (``_tp_partial_grad``): replicated over tp, but each tp rank saw only its
  own tokens, so the gradient is summed over tp before the dp average.

FSDP2 (``models/fsdp.py``) replaces every parameter by a DTensor one and carries the tags over
(:func:`tags_of`, :func:`set_tags`); an expert tag then describes the DTensor's global shape over
the edp ranks, which is the ep shard above.
"""

from __future__ import annotations

import torch

EXPERT = "_moe_expert"
EXPERT_OFFSET = "_moe_expert_offset"
WHOLE_EXPERT = "_moe_whole_expert"
TP_SHARDED = "_tp_sharded"
TP_SHARD_DIM = "_tp_shard_dim"
TP_PARTIAL_GRAD = "_tp_partial_grad"
ETP_SHARD_DIM = "_etp_shard_dim"
ETP_PARTS = "_etp_parts"
ETP_RANK = "_etp_rank"
ETP_SIZE = "_etp_size"


def mark_expert_param(param: torch.Tensor, offset: int = 0) -> None:
    """Tag ``param`` as an expert shard whose row 0 is global row ``offset`` along dim 0."""
    setattr(param, EXPERT, True)
    setattr(param, EXPERT_OFFSET, offset)


def mark_whole_expert(param: torch.Tensor) -> None:
    """Tag ``param`` as one expert's whole tensor, held by one ep rank (see the module docstring)."""
    mark_expert_param(param)
    setattr(param, WHOLE_EXPERT, True)


def is_whole_expert(param: torch.Tensor) -> bool:
    return bool(getattr(param, WHOLE_EXPERT, False))


def is_expert_param(param: torch.Tensor) -> bool:
    return bool(getattr(param, EXPERT, False))


def expert_offset(param: torch.Tensor) -> int:
    """Global index of this shard's first row along dim 0 (0 when not sharded)."""
    return int(getattr(param, EXPERT_OFFSET, 0))


def etp_blocks(length: int, parts: int, rank: int, size: int) -> list[tuple[int, int]]:
    """``(global start, length)`` along the etp dim of every block etp rank ``rank`` holds, in its
    local order: block ``rank`` of each of the ``parts`` fused parts of a dim of ``length``.

    w13's last dim (2F = gate | up, parts 2), F = 8, etp 2: rank 0 holds [(0, 4), (8, 4)] (gate
    0-3, up 0-3), rank 1 holds [(4, 4), (12, 4)] (gate 4-7, up 4-7).
    """
    if length % (parts * size) != 0:
        raise ValueError(f"a dim of {length} does not split into {parts} part(s) x {size} etp blocks")
    part, block = length // parts, length // (parts * size)
    return [(p * part + rank * block, block) for p in range(parts)]


def take_etp_shard(full: torch.Tensor, dim: int, parts: int, rank: int, size: int) -> torch.Tensor:
    """Etp rank ``rank``'s shard of ``full`` along ``dim`` (a new contiguous tensor)."""
    return torch.cat([full.narrow(dim, start, length)
                      for start, length in etp_blocks(full.shape[dim], parts, rank, size)], dim=dim)


def mark_etp_shard(param: torch.Tensor, dim: int, parts: int, rank: int, size: int) -> None:
    """Tag ``param`` as etp rank ``rank``'s shard (of ``size``) along ``dim`` of ``parts`` fused
    parts (see :func:`etp_blocks`). The tensor must be an expert shard too."""
    setattr(param, ETP_SHARD_DIM, dim)
    setattr(param, ETP_PARTS, parts)
    setattr(param, ETP_RANK, rank)
    setattr(param, ETP_SIZE, size)


def etp_shard(param: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(dim, parts, rank, size)`` of an etp-sharded parameter, None when it is not split over etp."""
    if getattr(param, ETP_SIZE, 1) == 1:
        return None
    return (getattr(param, ETP_SHARD_DIM), getattr(param, ETP_PARTS), getattr(param, ETP_RANK),
            getattr(param, ETP_SIZE))


def mark_tp_shard(param: torch.Tensor, dim: int) -> None:
    setattr(param, TP_SHARDED, True)
    setattr(param, TP_SHARD_DIM, dim)


def is_tp_sharded(param: torch.Tensor) -> bool:
    """A dense parameter split over the tp group (its norm is summed over tp)."""
    return bool(getattr(param, TP_SHARDED, False))


def tp_shard_dim(param: torch.Tensor) -> int | None:
    """The dim along which this parameter is split over tp, or None if it is not split."""
    return getattr(param, TP_SHARD_DIM, None)


def mark_tp_partial_grad(param: torch.Tensor) -> None:
    setattr(param, TP_PARTIAL_GRAD, True)


def is_tp_partial_grad(param: torch.Tensor) -> bool:
    """Replicated over tp, gradient partial per tp rank: sum it over the tp group."""
    return bool(getattr(param, TP_PARTIAL_GRAD, False))


_TAGS = (EXPERT, EXPERT_OFFSET, TP_SHARDED, TP_SHARD_DIM, TP_PARTIAL_GRAD, ETP_SHARD_DIM, ETP_PARTS, ETP_RANK,
         ETP_SIZE)


def tags_of(param: torch.Tensor) -> dict[str, object]:
    """Every tag set on ``param``, to carry over to a parameter that replaces it (FSDP2's
    ``fully_shard`` swaps each parameter for a new DTensor one, without its attributes)."""
    return {name: getattr(param, name) for name in _TAGS if hasattr(param, name)}


def set_tags(param: torch.Tensor, tags: dict[str, object]) -> None:
    for name, value in tags.items():
        setattr(param, name, value)
