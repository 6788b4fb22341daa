"""``parallelize(model, mesh, cfg)``: apply TP, then EP, then the data-parallel gradient hooks.

The model arrives single-device and identically initialised on every rank (same seed). In order:

1. tensor parallelism (``tensor_parallel.apply_tp``) for attention, dense MLPs, embeddings and
   head, when ``tp > 1``;
2. expert parallelism (:func:`~moe_dist.distributed.expert_parallel.apply_ep`): slice the
   experts, tag them, install the all-to-all dispatcher;
3. gradient reduction (:class:`~moe_dist.distributed.data_parallel.GradReducer`): backward hooks
   that reduce dense grads over dp and expert grads over edp (both divided by dp).

It returns a :class:`DistributedPlan`, the object the trainer talks to (the same interface as
``moe_dist.train.runtime.LocalPlan``): ``no_sync``, ``finish_gradient_sync``,
``clip_grad_norm_``, ``cross_entropy``, ``mean_over_dp``, ``sum_over_token_ranks``,
``after_optimizer_step``, ``save_model_and_optimizer``, ``load_model_and_optimizer``.

Router balance losses stay per rank: each rank's aux and z losses are computed on its own
micro-batch, exactly as the single-process model computes them on the same micro-batch, and the
gradient average over dp then averages them as the reference averages its micro-batches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from moe_dist.config import Config, ParallelConfig
from moe_dist.distributed import checkpoint as dist_checkpoint
from moe_dist.distributed import comms
from moe_dist.distributed.data_parallel import GradReducer, clip_grad_norm_
from moe_dist.distributed.expert_parallel import apply_ep
from moe_dist.distributed.peer_parallel import apply_arch_parallel
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.models.cross_entropy import token_cross_entropy


class DistributedPlan:
    """What the trainer calls around backward and the optimizer step on a parallel mesh."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, reducer: GradReducer) -> None:
        self.model = model
        self.mesh = mesh
        self.reducer = reducer

    # gradients ---------------------------------------------------------------------------------
    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Wrap every micro-batch's forward+backward but the last of a step."""
        return self.reducer.no_sync()

    def finish_gradient_sync(self) -> None:
        """After the last backward of a step: grads become the global-batch gradient."""
        self.reducer.finish()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global grad norm (experts summed over ep, dense counted once); clips unless inf/0."""
        return clip_grad_norm_(self.model.parameters(), max_norm, self.mesh)

    # losses and reductions ---------------------------------------------------------------------
    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of this rank's micro-batch (logits are full-vocabulary)."""
        return token_cross_entropy(logits, targets)  # fused on CUDA; F.cross_entropy in fp32 elsewhere

    def mean_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average a per-rank value (e.g. a loss) over the data-parallel shards of the batch."""
        return comms.all_reduce(tensor.clone(), "avg", self.mesh.dp_group)

    def sum_over_token_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every rank that routes different tokens: dp and tp (under TP each tp rank
        routes its own slice of the tokens, with or without sequence parallelism)."""
        comms.all_reduce(tensor, "sum", self.mesh.dp_group)
        comms.all_reduce(tensor, "sum", self.mesh.tp_group)
        return tensor

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Routing-state updates that must stay identical on every rank (aux-free bias)."""
        from moe_dist.moe.balance import update_selection_bias_from_stats

        update_selection_bias_from_stats(model, reduce_fn=self.sum_over_token_ranks)

    # checkpoints (collective: every rank calls them) ---------------------------------------------
    def save_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write global tensors with DCP, readable at any layout (see distributed/checkpoint.py)."""
        dist_checkpoint.save_model_and_optimizer(directory, model, optimizer, self.mesh)

    def load_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Read this rank's slices of a checkpoint written at any layout."""
        dist_checkpoint.load_model_and_optimizer(directory, model, optimizer, self.mesh)


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: Config | ParallelConfig,
                bucket_mb: float = 25.0, record: comms.CollectiveRecord | None = None) -> DistributedPlan:
    """Apply TP (tp > 1), EP and the gradient-reduction hooks to ``model`` in place.

    ``record`` is handed to every all-to-all dispatcher, so a ``CollectiveWatchdog`` built on it
    reports the last dispatch's split sizes when a collective hangs.
    """
    parallel = cfg.parallel if isinstance(cfg, Config) else cfg
    if mesh.tp_size > 1:
        try:
            from moe_dist.distributed.tensor_parallel import apply_tp
        except ImportError as exc:
            raise ValueError(f"parallel.tp ({mesh.tp_size}) > 1 needs moe_dist.distributed.tensor_parallel"
                             f" ({exc}); use tp=1") from exc
        apply_tp(model, mesh, parallel)
    apply_ep(model, mesh, record)
    apply_arch_parallel(model, mesh)  # PEER table shards, stratified pass agreement
    reducer = GradReducer(model, mesh, bucket_mb=bucket_mb)
    return DistributedPlan(model, mesh, reducer)
