"""Data-parallel gradient reduction under expert parallelism, and a mesh-aware grad-norm clip.

Which ranks hold the same parameter, and by what to divide
-----------------------------------------------------------
Every rank's loss is the mean over its own micro-batch, and the global loss is the mean over the
``dp`` data-parallel shards of the batch: ``L = (1/dp) * sum_r L_r``.

* A **dense** parameter is replicated over the dp group, and rank r's backward gives
  ``dL_r/dw``; so ``dL/dw = (1/dp) * sum over dp of the local grads`` (an average over dp).
* An **expert** parameter lives on one rank of each ep group and is replicated over the edp
  group. Its local gradient already sums the contributions of every rank of its ep group,
  because the all-to-all's backward returns them: ``sum_{r in ep group} dL_r/dw``. The ep group
  times the edp group covers all dp shards of the batch, so
  ``dL/dw = (1/dp) * sum over edp of the local grads`` -- a *sum* over edp divided by the
  **dp** size, not an average over edp. (With ep = dp, edp is 1 and the gradient is only
  scaled by 1/dp.) tests/distributed/test_dp_parity.py checks both rules against the
  single-process model.
* An **expert shard under etp** (its FFN columns split over the etp group, ``moe/dispatch/etp.py``)
  changes nothing: the etp all-gather hands every etp rank the rows of its whole etp group, so
  the shard's local gradient sums the tokens of the ``ep x etp`` block (the reduce-scatter's
  backward is an all-gather of the output gradients), and edp x ep x etp is the whole world:
  again ``(1/dp) * sum over edp``. Only the norm changes: the etp shards are disjoint, so their
  squared norms are summed over etp as well (:func:`grad_norm`).
  tests/distributed/test_etp_parity.py checks it.

Worked example, world 4, ``dp=4, ep=2``: ep groups [0,1] [2,3], edp groups [0,2] [1,3]. Expert 0
lives on ranks 0 and 2; rank 0's grad sums the tokens of ranks 0 and 1, rank 2's those of 2 and
3; the all-reduce over [0,2] then sums all four and the 1/4 makes it the mean.

Bucketing and overlap
---------------------
Parameters are grouped by (group, divisor, dtype), in reverse registration order (about the order
backward produces them), into flat buckets of ``bucket_mb``. A ``post_accumulate_grad`` hook marks a
parameter ready; a full bucket is scaled and all-reduced straight from the hook, so the reduction
of late layers overlaps with the backward of early ones (asynchronously where comms offers
``all_reduce_async``). Buckets are always launched in bucket order, so every rank issues the same
collectives in the same order even if a parameter got no gradient on one of them.
:meth:`GradReducer.finish` launches what is left, waits, and copies the results back.

Gradient accumulation: run every micro-batch but the last inside :meth:`GradReducer.no_sync`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_dist.distributed import comms
from moe_dist.distributed.param_tags import etp_shard, is_expert_param, is_tp_partial_grad, is_tp_sharded

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from moe_dist.distributed.mesh import ParallelMesh


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    groups: tuple[ProcessGroup, ...]  # summed over each in turn
    divisor: int
    ready: set[int] = field(default_factory=set)
    buffer: torch.Tensor | None = None
    work: Any = None
    launched: bool = False


class GradReducer:
    """Reduces gradients after backward: dense over dp, experts over edp, both divided by dp.

    Usage per optimizer step::

        for micro in micro_batches[:-1]:
            with reducer.no_sync():
                loss(micro).backward()
        loss(micro_batches[-1]).backward()   # buckets launch from the backward hooks
        reducer.finish()                     # wait; .grad now holds the global-batch gradient
        clip_grad_norm_(params, max_norm, mesh); optimizer.step()
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh, bucket_mb: float = 25.0) -> None:
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb ({bucket_mb}) must be positive")
        self.mesh = mesh
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._sync = True
        self.buckets = self._build_buckets([p for p in model.parameters() if p.requires_grad])
        self._bucket_of: dict[int, int] = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._next_launch = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for b in self.buckets for p in b.params]

    # setup ------------------------------------------------------------------------------------
    def _spec(self, param: nn.Parameter) -> tuple[tuple[ProcessGroup, ...], int]:
        """The groups to sum the gradient over, in order, and the divisor (always dp)."""
        if is_expert_param(param):
            groups = (self.mesh.expert_grad_group,)
        elif is_tp_partial_grad(param):  # each tp rank saw its own tokens: sum over tp too
            groups = (self.mesh.tp_group, self.mesh.dense_grad_group)
        else:
            groups = (self.mesh.dense_grad_group,)
        return tuple(g for g in groups if g is not None), self.mesh.dp_size

    def _build_buckets(self, params: list[nn.Parameter]) -> list[_Bucket]:
        open_buckets: dict[tuple, _Bucket] = {}
        sizes: dict[tuple, int] = {}
        buckets: list[_Bucket] = []
        for param in reversed(params):
            groups, divisor = self._spec(param)
            if not groups and divisor == 1:
                continue  # nothing to do for a parameter nobody else holds
            key = (tuple(id(g) for g in groups), divisor, param.dtype, param.device)
            nbytes = param.numel() * param.element_size()
            bucket = open_buckets.get(key)
            if bucket is None or (sizes[key] + nbytes > self.bucket_bytes and bucket.params):
                bucket = _Bucket([], groups, divisor)
                open_buckets[key], sizes[key] = bucket, 0
                buckets.append(bucket)
            bucket.params.append(param)
            sizes[key] += nbytes
        return buckets

    # accumulation control ---------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally; the next one outside reduces."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # hooks ------------------------------------------------------------------------------------
    def _on_grad(self, param: nn.Parameter) -> None:
        if not self._sync:
            return
        index = self._bucket_of[id(param)]
        bucket = self.buckets[index]
        if bucket.launched:
            raise RuntimeError("a gradient arrived for an already reduced bucket: call "
                               "GradReducer.finish() once per step and run the non-final "
                               "micro-batches inside GradReducer.no_sync()")
        bucket.ready.add(id(param))
        while (self._next_launch < len(self.buckets)
               and len(self.buckets[self._next_launch].ready) == len(self.buckets[self._next_launch].params)):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if bucket.divisor != 1:
            flat.div_(bucket.divisor)
        bucket.buffer, bucket.launched = flat, True
        launch_async = getattr(comms, "all_reduce_async", None)
        if launch_async is not None and len(bucket.groups) == 1:
            bucket.work = launch_async(flat, "sum", bucket.groups[0])
            return
        for group in bucket.groups:
            comms.all_reduce(flat, "sum", group)

    # after backward ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Launch the buckets not yet launched, wait for all, write the reduced grads back."""
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            assert bucket.buffer is not None
            offset = 0
            for param in bucket.params:
                n = param.numel()
                reduced = bucket.buffer[offset:offset + n].view_as(param)
                if param.grad is None:
                    param.grad = reduced.clone()
                else:
                    param.grad.copy_(reduced)
                offset += n
            bucket.buffer, bucket.work, bucket.launched = None, None, False
            bucket.ready.clear()
        self._next_launch = 0

    def discard(self) -> None:
        """Forget a partly reduced step (e.g. after an error), keeping the local grads as they are.

        Only safe when every rank discards the same step: launched collectives are not undone.
        """
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.buffer, bucket.work, bucket.launched = None, None, False
            bucket.ready.clear()
        self._next_launch = 0

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --------------------------------------------------------------------------------------------
# Gradient-norm clipping
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def grad_norm(params: Iterable[torch.Tensor], mesh: ParallelMesh) -> torch.Tensor:
    """Global L2 norm of the full model's gradient, from reduced grads on every rank.

    Replicated dense grads are counted once (every rank holds the same values); expert shards
    are summed over the ep group (each ep rank holds different experts, edp replicas are equal)
    and, when split over etp, over the etp group too (each etp rank holds different FFN columns);
    tp-sharded dense grads are summed over the tp group.
    """
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    sq = {kind: torch.zeros((), device=device, dtype=torch.float32)
          for kind in ("dense", "expert", "expert_etp", "tp")}
    for p in params:
        kind = (("expert_etp" if etp_shard(p) is not None else "expert") if is_expert_param(p)
                else "tp" if is_tp_sharded(p) else "dense")
        sq[kind] += p.grad.detach().float().square().sum()
    comms.all_reduce(sq["expert_etp"], "sum", mesh.etp_group)  # ep x etp: orthogonal groups
    sq["expert"] += sq["expert_etp"]
    comms.all_reduce(sq["expert"], "sum", mesh.ep_group)
    comms.all_reduce(sq["tp"], "sum", mesh.tp_group)
    return (sq["dense"] + sq["expert"] + sq["tp"]).sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, mesh: ParallelMesh) -> torch.Tensor:
    """Scale grads so the global norm is at most ``max_norm`` (0 only measures); returns the norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: ``coef = min(1, max_norm / (norm + 1e-6))``.
    """
    params = list(params)
    total = grad_norm(params, mesh)
    _scale_below(total, max_norm, [p.grad for p in params if p.grad is not None])
    return total


def _scale_below(total: torch.Tensor, max_norm: float, grads: list[torch.Tensor]) -> None:
    """Scale ``grads`` in place by ``min(1, max_norm / (total + 1e-6))`` (nothing if max_norm is 0 or inf)."""
    if max_norm > 0 and math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coef.to(grad.dtype))


# --------------------------------------------------------------------------------------------
# Gradient-norm clipping of FSDP2-sharded (DTensor) gradients
# --------------------------------------------------------------------------------------------

def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (a DTensor's local tensor, shared storage; else the tensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def sharded_grad_norm(params: Iterable[torch.Tensor], mesh: ParallelMesh) -> torch.Tensor:
    """Global L2 norm of gradients sharded by FSDP2 (``models/fsdp.py``).

    Each rank holds a disjoint piece of every gradient: a dense one is split over the dp group,
    an expert one over the edp group within its ep block. So the squared local pieces are
    summed over dp (dense) and over edp then ep (experts). A gradient that is not a DTensor is
    replicated and counted once.
    """
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    sq = {kind: torch.zeros((), device=device, dtype=torch.float32) for kind in ("dense", "expert", "replicated")}
    for p in params:
        kind = ("replicated" if not hasattr(p.grad, "to_local")
                else "expert" if is_expert_param(p) else "dense")
        sq[kind] += _local(p.grad).detach().float().square().sum()
    comms.all_reduce(sq["dense"], "sum", mesh.dp_group)
    comms.all_reduce(sq["expert"], "sum", mesh.edp_group)
    comms.all_reduce(sq["expert"], "sum", mesh.ep_group)
    return (sq["dense"] + sq["expert"] + sq["replicated"]).sqrt()


@torch.no_grad()
def clip_sharded_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, mesh: ParallelMesh) -> torch.Tensor:
    """:func:`clip_grad_norm_` for FSDP2-sharded gradients: each rank scales its own shards."""
    params = list(params)
    total = sharded_grad_norm(params, mesh)
    _scale_below(total, max_norm, [_local(p.grad) for p in params if p.grad is not None])
    return total
