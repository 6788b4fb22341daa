"""The plan: what the trainer calls around forward, backward and the optimizer step, so that the
training loop never branches on the world size or the engine.

:class:`Plan` is the interface every engine provides (losses, reductions, routing-state updates);
:class:`GradientPlan` adds what the native engine needs because it owns backward and the step
(gradient sync, clipping, checkpoint payloads). Three implementations:

* :class:`LocalPlan` -- one process: every reduction is the identity;
* :class:`DistributedPlan` -- a DP x TP x EP mesh with moe_dist's own gradient reduction
  (:class:`~moe_dist.distributed.grad_sync.GradReducer`); built by :func:`parallelize`;
* :class:`FSDPPlan` -- the same mesh with ``parallel.fsdp``: FSDP2 shards parameters, gradients
  and optimizer state (``models/fsdp.py``) and reduce-scatters the gradients; built by
  :func:`parallelize` too;
* :class:`DeepSpeedPlan` -- a DeepSpeed engine does gradient reduction, clipping and the step.

Router balance losses stay per rank: each rank's aux and z losses are computed on its own
micro-batch, exactly as the single-process model computes them on the same micro-batch, and the
gradient average over dp then averages them as the reference averages its micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from moe_dist.config import Config, ParallelConfig
from moe_dist.distributed import checkpoint as dist_checkpoint
from moe_dist.distributed import comms
from moe_dist.distributed.grad_sync import (GradReducer, clip_grad_norm_, clip_sharded_grad_norm_, grad_norm,
                                            sharded_grad_norm)
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.models.cross_entropy import token_cross_entropy
from moe_dist.models.fsdp import apply_fsdp
from moe_dist.models.parallelize import parallelize_model
from moe_dist.moe.reduction import ReduceFn
from moe_dist.moe.routing.state import update_selection_bias_from_stats


class Plan(Protocol):
    """What every engine's trainer calls."""

    sum_over_token_ranks: ReduceFn | None
    """Sum a tensor over every rank that routes different tokens (None: one process)."""

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def mean_over_dp(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def after_optimizer_step(self, model: nn.Module) -> None: ...


class GradientPlan(Plan, Protocol):
    """A plan whose trainer owns backward, the gradient sync and the checkpoint payload."""

    def no_sync(self) -> contextlib.AbstractContextManager[None]: ...

    def finish_gradient_sync(self) -> None: ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm, as :meth:`clip_grad_norm_` measures it, without clipping."""
        ...

    def save_model_and_optimizer(self, directory: Path, model: nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None: ...

    def load_model_and_optimizer(self, directory: Path, model: nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None: ...


class _PlanBase:
    """The parts every plan shares: the token loss and the routing-state update."""

    sum_over_token_ranks: ReduceFn | None = None

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of this rank's micro-batch (logits are full-vocabulary)."""
        return token_cross_entropy(logits, targets)  # fused on CUDA; F.cross_entropy in fp32 elsewhere

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Routing-state updates that must stay identical on every rank (aux-free bias,
        capacity controllers, DynMoE growth), from counts summed over the token ranks."""
        update_selection_bias_from_stats(model, reduce_fn=self.sum_over_token_ranks)


class LocalPlan(_PlanBase):
    """Single process: every reduction is the identity."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    def attach(self, model: nn.Module) -> LocalPlan:
        self.model = model
        return self

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def finish_gradient_sync(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        # foreach=None: torch's multi-tensor norm on CUDA; on CPU the same per-tensor loop as before
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=None)

    def grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=None)

    def mean_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # The same DCP format as every distributed layout, so checkpoints move between them.
    def save_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer) -> None:
        dist_checkpoint.save_model_and_optimizer(directory, model, optimizer, ParallelMesh.single())

    def load_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer) -> None:
        dist_checkpoint.load_model_and_optimizer(directory, model, optimizer, ParallelMesh.single())


class _MeshReductions(_PlanBase):
    """Reductions over the data-parallel and token ranks of a mesh."""

    mesh: ParallelMesh

    def mean_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average a per-rank value (e.g. a loss) over the data-parallel shards of the batch."""
        return comms.all_reduce(tensor.clone(), "avg", self.mesh.dp_group)

    def sum_over_token_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every rank that routes different tokens: dp and tp (under TP each tp rank
        routes its own slice of the tokens, with or without sequence parallelism)."""
        comms.all_reduce(tensor, "sum", self.mesh.dp_group)
        comms.all_reduce(tensor, "sum", self.mesh.tp_group)
        return tensor


class _MeshCheckpoints(_MeshReductions):
    """DCP checkpoints of global tensors (collective: every rank calls them)."""

    def save_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write global tensors with DCP, readable at any layout (see distributed/checkpoint.py)."""
        dist_checkpoint.save_model_and_optimizer(directory, model, optimizer, self.mesh)

    def load_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Read this rank's slices of a checkpoint written at any layout."""
        dist_checkpoint.load_model_and_optimizer(directory, model, optimizer, self.mesh)


class DistributedPlan(_MeshCheckpoints):
    """A parallel mesh with moe_dist's gradient reduction hooks."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, reducer: GradReducer) -> None:
        self.model = model
        self.mesh = mesh
        self.reducer = reducer

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Wrap every micro-batch's forward+backward but the last of a step."""
        return self.reducer.no_sync()

    def finish_gradient_sync(self) -> None:
        """After the last backward of a step: grads become the global-batch gradient."""
        self.reducer.finish()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global grad norm (experts summed over ep, dense counted once); clips unless inf/0."""
        return clip_grad_norm_(self.model.parameters(), max_norm, self.mesh)

    def grad_norm(self) -> torch.Tensor:
        return grad_norm(self.model.parameters(), self.mesh)


class FSDPPlan(_MeshCheckpoints):
    """FSDP2 on a mesh (``parallel.fsdp``): dense parameters sharded over dp, experts over edp.

    FSDP reduce-scatters each block's gradients from its post-backward hook and waits for them
    at the end of backward, so :meth:`finish_gradient_sync` has nothing left to do. Gradients,
    parameters and AdamW's state are DTensor shards; checkpoints hold the same global tensors as
    every other layout.
    """

    def __init__(self, model: nn.Module, mesh: ParallelMesh) -> None:
        self.model = model
        self.mesh = mesh

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-batches inside accumulate unsharded gradients locally; the next backward outside
        reduce-scatters the sum (FSDP2's ``set_requires_gradient_sync``)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def finish_gradient_sync(self) -> None:
        """Nothing: FSDP's end-of-backward callback already waited for the reduce-scatters."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global grad norm from the shards (dense summed over dp, experts over edp and ep)."""
        return clip_sharded_grad_norm_(self.model.parameters(), max_norm, self.mesh)

    def grad_norm(self) -> torch.Tensor:
        return sharded_grad_norm(self.model.parameters(), self.mesh)


class DeepSpeedPlan(_MeshReductions):
    """Gradient reduction, clipping, the step and the checkpoint files belong to the DeepSpeed
    engine (``moe_dist.train.engines.deepspeed``); this plan keeps the losses and reductions."""

    def __init__(self, mesh: ParallelMesh) -> None:
        self.mesh = mesh


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: Config | ParallelConfig,
                bucket_mb: float = 25.0, record: comms.CollectiveRecord | None = None,
                param_dtype: torch.dtype | None = None) -> DistributedPlan | FSDPPlan:
    """Parallelize ``model`` in place (``models.parallelize.parallelize_model``), then either
    shard it with FSDP2 (``parallel.fsdp``; ``param_dtype`` bf16 for mixed precision) or install
    the gradient-reduction hooks: the native engine's plan on a mesh."""
    parallel = cfg.parallel if isinstance(cfg, Config) else cfg
    parallelize_model(model, mesh, parallel, record)
    if parallel.fsdp:
        return FSDPPlan(apply_fsdp(model, mesh, param_dtype=param_dtype), mesh)
    return DistributedPlan(model, mesh, GradReducer(model, mesh, bucket_mb=bucket_mb))
