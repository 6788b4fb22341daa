"""``parallelize_model(model, mesh, parallel)``: apply TP, then EP, then the research
architectures' pieces to a model built for one device, in place.

The model arrives single-device and identically initialised on every rank (same seed). In order:

1. tensor parallelism (:func:`~moe_dist.models.tensor_parallel.apply_tp`) for attention, dense
   MLPs, embeddings and head, when ``tp > 1``;
2. expert parallelism (:func:`~moe_dist.models.expert_parallel.apply_ep`): slice the experts,
   tag them, install the all-to-all dispatcher;
3. the architectures' own pieces (:func:`~moe_dist.models.arch_parallel.apply_arch_parallel`):
   PEER table shards, Stratified MoE pass agreement.

Both training engines call this one function, so a model is parallelized the same way under the
native engine and under DeepSpeed. Gradient reduction is the engine's business
(``moe_dist.train.plan``), driven by the parameter tags the steps above leave
(``moe_dist.distributed.param_tags``).
"""

from __future__ import annotations

from torch import nn

from moe_dist.config import ParallelConfig
from moe_dist.distributed import comms
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.models.arch_parallel import apply_arch_parallel
from moe_dist.models.expert_parallel import apply_ep
from moe_dist.models.tensor_parallel import apply_tp


def parallelize_model(model: nn.Module, mesh: ParallelMesh, parallel: ParallelConfig,
                      record: comms.CollectiveRecord | None = None) -> nn.Module:
    """Apply TP (tp > 1), EP and the architecture specifics to ``model`` in place; return it.

    ``record`` is handed to every all-to-all dispatcher, so a ``CollectiveWatchdog`` built on it
    reports the last dispatch's split sizes when a collective hangs.
    """
    if mesh.tp_size > 1:
        apply_tp(model, mesh, parallel)
    apply_ep(model, mesh, record)
    apply_arch_parallel(model, mesh)
    return model
