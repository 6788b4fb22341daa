"""Layout-independent checkpoints: model and optimizer state through ``torch.distributed.checkpoint``.

One format for every layout. A checkpoint holds *global* tensors under the single-process
model's names (``model.<fqn>``, ``optim.state.<fqn>.<slot>``, ``optim.param_groups.<i>.<key>``),
each written as one or more chunks with their offsets. A run saved at (dp=4, ep=4) can therefore
resume at (dp=2, ep=2), at ep=1 or in one process: each rank reads the slices it now holds.

How a local shard becomes a global tensor
-----------------------------------------
A sharded parameter is wrapped as a ``DTensor`` with one ``Shard(dim)`` placement on the 1-D
sub-mesh of the dimension that splits it (``DTensor.from_local(..., run_check=False, shape=...,
stride=...)``: no communication, the storage is shared). DCP turns that into a chunk at offset
``rank_in_submesh * local_size`` along ``dim``:

* expert weights (tagged ``_moe_expert``) under ``ep > 1``: dim 0 over ``ep``. Rank r of the ep
  group holds experts ``[r*L, (r+1)*L)`` (``GroupedExperts.expert_offset``), PEER tables rows
  ``[r*N/P, (r+1)*N/P)``: contiguous equal blocks in ep-rank order, exactly DTensor's ``Shard(0)``.
* tensor-parallel shards (tagged ``_tp_sharded``) under ``tp > 1``: dim ``_tp_shard_dim`` over ``tp``.
* expert weights split over ``etp`` too (tagged ``etp_shard``, expert tensor parallelism): a 2-D
  sharding, dim 0 over ``ep`` and the FFN dim over ``etp``. ``w13``'s FFN dim is the gate and the
  up projection fused, and each is split over etp on its own, so an etp rank's ``[L, D, 2F/etp]``
  is *two* boxes of the global ``[E, D, 2F]`` (its gate block and its up block), which no
  DTensor placement describes. Such a tensor is handed to DCP as its local shard plus the list
  of boxes (:meth:`ShardSpec.boxes`), and the planners of ``checkpoint_planner.py`` write and
  read one chunk per box (views of the local shard: a load fills it in place). On disk it is the
  same global tensor in more chunks, so an ``ep=2 x etp=2`` checkpoint loads in one process and
  the other way round.
* whole experts (tagged ``_moe_whole_expert``: HMoE's width-placed experts, one tensor per expert
  under its single-process name, each held by one ep rank): a plain tensor written by its owner.
  A rank reads the experts it owns at the new layout; the names it does not hold are listed by
  the module (``state_names_elsewhere()``) so :func:`check_fits` does not call them unexpected.
* everything else (dense weights, buffers, AdamW's ``step``): a plain tensor, i.e. replicated.

Under FSDP2 (``parallel.fsdp``, ``models/fsdp.py``) parameters and AdamW's slots are DTensors
already. A dense one is global as it stands (``Shard(0)`` over dp) and is handed to DCP
unchanged. An expert one is global only over edp (``Shard(1)``: FSDP splits dim 1, the ep block
is this rank's experts); its local shard is rewrapped on the ``(edp, ep)`` slice of the MoE mesh
with placements ``(Shard(1), Shard(0))``, which is the full ``[num_experts, ...]`` tensor. The
chunks on disk are then smaller, but they tile the same global tensors under the same names, so
an FSDP checkpoint resumes without FSDP and the other way round.

Replicas (the edp copies of an expert, the dp copies of a dense weight) present the same chunk;
DCP's planner keeps one of them. The optimizer's per-element slots (``exp_avg``, ``exp_avg_sq``)
are wrapped exactly like their parameter, so they follow its sharding.

DTensor was chosen over a custom DCP planner because it needs no planner code and works on CPU
gloo in torch 2.13 over a slice of a multi-dimensional ``DeviceMesh`` (``mesh.submesh('ep')``).
The etp shards, which DTensor cannot describe, are the one case that needs the small planners.

Checks
------
* :func:`verify_coverage` after every save: each tensor's chunks must tile its global shape
  exactly (inside the bounds, no overlaps, no gaps) and each chunk must have stored bytes, so
  every expert and its optimizer slots were written exactly once. It raises
  :class:`CheckpointError` naming the tensor otherwise.
* :func:`check_fits` before every load: a tensor missing from the checkpoint, an unexpected one,
  or a different global shape is an error naming the tensor and both shapes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from moe_dist.distributed.checkpoint_planner import BoxLoadPlanner, BoxSavePlanner
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.distributed.param_tags import (
    etp_blocks,
    etp_shard,
    expert_offset,
    is_expert_param,
    is_tp_sharded,
    is_whole_expert,
    tp_shard_dim,
)

MODEL = "model"
OPTIM = "optim"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


_MAX_LISTED = 20


@dataclass(frozen=True)
class ShardSpec:
    """How this rank's tensor sits in the global one: block ``rank`` of ``size`` along ``dim``,
    and with ``etp`` (``(dim, parts, rank, size)``, see ``param_tags.etp_blocks``) also split over
    the etp group along another dim."""

    mesh_dim: str
    """'ep' or 'tp': the sub-mesh whose ranks hold the blocks."""
    dim: int
    rank: int
    size: int
    etp: tuple[int, int, int, int] | None = None

    def global_shape(self, local: torch.Size) -> tuple[int, ...]:
        shape = list(local)
        shape[self.dim] *= self.size
        if self.etp is not None:
            shape[self.etp[0]] *= self.etp[3]
        return tuple(shape)

    def boxes(self, local: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """``(global offset, view of local)`` of every box of an etp shard: one per fused part."""
        assert self.etp is not None, "only an etp shard is written box by box"
        dim, parts, rank, size = self.etp
        offset = [0] * local.ndim
        offset[self.dim] = self.rank * local.shape[self.dim]
        per_part = local.shape[dim] // parts
        out = []
        for part, (start, _) in enumerate(etp_blocks(local.shape[dim] * size, parts, rank, size)):
            offset[dim] = start
            out.append((tuple(offset), local.narrow(dim, part * per_part, per_part)))
        return out


def shard_spec(param: torch.Tensor, mesh: ParallelMesh) -> ShardSpec | None:
    """The sharding of a parameter on this mesh; None when it is replicated (or a whole expert)."""
    if is_whole_expert(param):
        return None
    if is_expert_param(param) and etp_shard(param) is not None:
        return ShardSpec("ep", 0, mesh.ep_rank, mesh.ep_size, etp=etp_shard(param))
    if is_expert_param(param) and mesh.ep_size > 1:
        return ShardSpec("ep", 0, mesh.ep_rank, mesh.ep_size)
    if is_tp_sharded(param) and mesh.tp_size > 1:
        dim = tp_shard_dim(param)
        assert dim is not None, "a tp-sharded parameter records its shard dim"
        return ShardSpec("tp", dim, mesh.tp_rank, mesh.tp_size)
    return None


def _check_expert_offsets(model: nn.Module, mesh: ParallelMesh) -> None:
    """DCP places block r at offset r*rows; every expert shard must really be laid out that way."""
    for name, param in model.named_parameters():
        if not is_expert_param(param) or is_whole_expert(param):
            continue
        rows = param.shape[0]
        expected = mesh.ep_rank * rows if mesh.ep_size > 1 else 0
        if expert_offset(param) != expected:
            raise CheckpointError(f"expert shard {name} starts at global row {expert_offset(param)}, "
                                  f"but ep rank {mesh.ep_rank} of {mesh.ep_size} should hold "
                                  f"[{expected}, {expected + rows}); apply_ep's slicing "
                                  "and the checkpoint layout disagree")
        etp = etp_shard(param)
        if (etp is None and mesh.etp_size > 1) or (etp is not None and etp[2:] != (mesh.etp_rank, mesh.etp_size)):
            raise CheckpointError(f"expert shard {name} is etp shard {etp and etp[2:]} (rank, size), but this "
                                  f"rank is etp rank {mesh.etp_rank} of {mesh.etp_size}; apply_ep's slicing "
                                  "and the checkpoint layout disagree")


def _as_global(local: torch.Tensor, spec: ShardSpec | None, mesh: ParallelMesh) -> torch.Tensor:
    """``local`` as a DCP-writable global tensor (DTensor for a shard, itself if replicated).

    An FSDP2 DTensor is global over its FSDP mesh already; only an expert one gains the ep
    blocks (see the module docstring). Either way the result shares ``local``'s storage.
    """
    from torch.distributed.tensor import DTensor, Shard

    local = local.detach()
    if spec is None or spec.etp is not None:
        return local  # an etp shard goes box by box (ShardedState.boxes)
    shape = spec.global_shape(local.shape)
    stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))  # contiguous
    if isinstance(local, DTensor):
        assert spec.mesh_dim == "ep" and mesh.moe_mesh is not None, "FSDP shards experts over edp, no tp"
        (fsdp_placement,) = local.placements
        dims = ("edp", "ep") if mesh.edp_size > 1 else ("ep",)
        placements = [fsdp_placement, Shard(0)] if mesh.edp_size > 1 else [Shard(0)]
        return DTensor.from_local(local.to_local(), mesh.moe_mesh[dims], placements, run_check=False,
                                  shape=torch.Size(shape), stride=stride)
    submesh = mesh.submesh(spec.mesh_dim)
    assert submesh is not None, f"sharded over {spec.mesh_dim} implies a {spec.mesh_dim} sub-mesh"
    return DTensor.from_local(local, submesh, [Shard(spec.dim)], run_check=False,
                              shape=torch.Size(shape), stride=stride)


# --------------------------------------------------------------------------------------------
# Building the state dict
# --------------------------------------------------------------------------------------------

@dataclass
class ShardedState:
    """A nested state dict for DCP plus what the checkpoint must hold.

    ``expected`` maps every flattened tensor key (``model.layers.0.moe.experts.w13``) to its
    global shape; ``specs`` maps it to its sharding (None: replicated); ``sources`` to the
    tensor as the model or optimizer holds it (a local shard, or FSDP's DTensor), whose storage
    the entry in ``state`` shares, so a DCP load into ``state`` fills it in place. ``boxes`` maps
    the key of every etp shard to its boxes (global offset, view), which the planners write and
    read instead of the entry in ``state``.
    """

    state: dict[str, Any]
    expected: dict[str, tuple[int, ...]]
    specs: dict[str, ShardSpec | None]
    sources: dict[str, torch.Tensor] = field(default_factory=dict)
    boxes: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = field(default_factory=dict)
    elsewhere: set[str] = field(default_factory=set)
    """Model keys held by another rank only (whole experts placed elsewhere)."""

    def add(self, key: str, tensor: torch.Tensor, spec: ShardSpec | None) -> None:
        self.expected[key] = spec.global_shape(tensor.shape) if spec else tuple(tensor.shape)
        self.specs[key] = spec
        self.sources[key] = tensor.detach()
        if spec is not None and spec.etp is not None:
            self.boxes[key] = spec.boxes(tensor.detach())


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def build_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: ParallelMesh,
                optim_slots: dict[str, dict[str, tuple[int, ...]]] | None = None) -> ShardedState:
    """The state of ``model`` (and ``optimizer``) as global tensors.

    For a save, ``optim_slots`` is None and the optimizer's current state is taken. For a load,
    ``optim_slots[fqn][slot]`` (from the checkpoint's metadata) lists the slots to read; they
    are allocated here (zeros shaped like this rank's shard).
    """
    _check_expert_offsets(model, mesh)
    model_state: dict[str, torch.Tensor] = {}
    sharded = ShardedState({MODEL: model_state}, {}, {})
    for fqn, module in model.named_modules():
        if hasattr(module, "state_names_elsewhere"):
            sharded.elsewhere.update(f"{MODEL}.{fqn}.{n}" if fqn else f"{MODEL}.{n}"
                                     for n in module.state_names_elsewhere())
    for name, tensor in model.state_dict(keep_vars=True).items():
        spec = shard_spec(tensor, mesh) if isinstance(tensor, nn.Parameter) else None
        model_state[name] = _as_global(tensor, spec, mesh)
        sharded.add(f"{MODEL}.{name}", tensor, spec)
    if optimizer is None:
        return sharded

    params = _named_params(model)
    slots_state: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, param in params.items():
        spec = shard_spec(param, mesh)
        if optim_slots is None:
            slots = {slot: value for slot, value in optimizer.state.get(param, {}).items()
                     if isinstance(value, torch.Tensor)}
        else:
            # An optimizer that keeps its per-element state in another dtype than the parameter
            # (AdamWBf16Moments) says so; the load converts whatever dtype the checkpoint holds.
            slot_dtype = getattr(optimizer, "state_dtype", None)
            slots = {slot: _allocate_slot(param, fqn, slot, shape, spec, slot_dtype)
                     for slot, shape in optim_slots.get(fqn, {}).items()}
        if not slots:
            continue
        slots_state[fqn] = {}
        for slot, value in slots.items():
            key = f"{OPTIM}.state.{fqn}.{slot}"
            follows_param = value.shape == param.shape and value.ndim > 0
            slot_spec = spec if follows_param else None
            slots_state[fqn][slot] = _as_global(value, slot_spec, mesh)
            sharded.add(key, value, slot_spec)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    sharded.state[OPTIM] = {"state": slots_state, "param_groups": groups}
    return sharded


def _allocate_slot(param: nn.Parameter, fqn: str, slot: str, global_shape: tuple[int, ...],
                   spec: ShardSpec | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    param_global = spec.global_shape(param.shape) if spec else tuple(param.shape)
    if global_shape == param_global and len(global_shape) > 0:
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format).detach()
    if math.prod(global_shape) == 1 or len(global_shape) == 0:
        return torch.zeros(global_shape, dtype=torch.float32)  # AdamW's step (always fp32 on CPU)
    raise CheckpointError(f"optimizer slot {OPTIM}.state.{fqn}.{slot}: checkpoint shape {global_shape} "
                          f"matches neither the parameter's global shape {param_global} nor a scalar")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _boxes_overlap(a_off, a_size, b_off, b_size) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size))


def verify_coverage(metadata: Metadata, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Every expected tensor is in ``metadata`` with its global shape, and its chunks tile it
    exactly once (in bounds, pairwise disjoint, volumes summing to the numel, bytes stored)."""
    problems = []
    for key, shape in expected.items():
        entry = metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            problems.append(f"tensor {key} (shape {shape}) was not written")
            continue
        if tuple(entry.size) != shape:
            problems.append(f"tensor {key}: written with global shape {tuple(entry.size)}, expected {shape}")
            continue
        chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        covered, overlapping = 0, False
        for i, (offset, size) in enumerate(chunks):
            if any(o < 0 or o + s > n for o, s, n in zip(offset, size, shape)):
                problems.append(f"tensor {key}: chunk at offset {offset} size {size} lies outside {shape}")
            if MetadataIndex(key, torch.Size(offset)) not in metadata.storage_data:
                problems.append(f"tensor {key}: chunk at offset {offset} has no stored bytes")
            covered += math.prod(size)
            for other_offset, other_size in chunks[:i]:
                if _boxes_overlap(offset, size, other_offset, other_size):
                    overlapping = True
                    problems.append(f"tensor {key}: chunks at offsets {other_offset} and {offset} overlap "
                                    "(a slice was written twice)")
        total = math.prod(shape)
        if covered != total and not overlapping:
            problems.append(f"tensor {key}: chunks cover {covered} of {total} elements (a shard is "
                            f"missing); chunks {[c[0] for c in chunks]} of sizes {[c[1] for c in chunks]}")
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        raise CheckpointError(f"checkpoint {source} failed its exactly-once check ({len(problems)} "
                              f"problem(s)); do not resume from it:\n  {listed}")


def check_fits(metadata: Metadata, expected: dict[str, tuple[int, ...]], source: str,
               elsewhere: set[str] | frozenset[str] = frozenset()) -> None:
    """Before loading: name every model tensor that is missing, unexpected or of another shape
    (``elsewhere``: keys another rank holds, not unexpected)."""
    problems = []
    for key, shape in expected.items():
        entry = metadata.state_dict_metadata.get(key)
        if entry is None:
            problems.append(f"missing tensor {key} (model expects shape {shape})")
        elif not isinstance(entry, TensorStorageMetadata):
            problems.append(f"entry {key} is not a tensor in the checkpoint")
        elif tuple(entry.size) != shape:
            problems.append(f"tensor {key}: checkpoint shape {tuple(entry.size)} != model shape {shape}")
    prefix = f"{MODEL}."
    for key in sorted(k for k in metadata.state_dict_metadata if k.startswith(prefix) and k not in expected
                      and k not in elsewhere):
        problems.append(f"unexpected tensor {key} in checkpoint")
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        raise CheckpointError(f"checkpoint {source} does not match the model ({len(problems)} problem(s)); "
                              f"was it written with another config?\n  {listed}")


def _optim_slots(metadata: Metadata, params: dict[str, nn.Parameter],
                 elsewhere: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{fqn: {slot: global shape}}`` of the optimizer state stored in the checkpoint (parameters
    that another rank holds, ``elsewhere`` as model keys, are skipped)."""
    prefix = f"{OPTIM}.state."
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    stored = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix)}
    for key, entry in stored.items():
        fqn, _, slot = key[len(prefix):].rpartition(".")
        if f"{MODEL}.{fqn}" in elsewhere:
            continue
        if fqn not in params:
            raise CheckpointError(f"checkpoint holds optimizer state {key} for a parameter the model "
                                  f"lacks ({fqn}); was it written with another config?")
        if isinstance(entry, TensorStorageMetadata):
            found.setdefault(fqn, {})[slot] = tuple(entry.size)
    return found


# --------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------

def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes the intent is to load in a single process'; it is ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_metadata(directory: Path) -> Metadata:
    try:
        return dcp.FileSystemReader(str(directory)).read_metadata()
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {directory} has no DCP metadata (.metadata): it was not "
                              "written by this version of moe_dist or is incomplete") from exc


def save_model_and_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                             mesh: ParallelMesh) -> Metadata:
    """Collective over every rank: write ``model`` and ``optimizer`` into ``directory`` as global
    tensors, then verify (on every rank) that each tensor was written exactly once."""
    return save_state(build_state(model, optimizer, mesh), directory)


def save_state(sharded: ShardedState, directory: Path) -> Metadata:
    """Collective: write ``sharded`` with DCP, read its metadata back and verify coverage.

    DCP's planner already refuses a global plan whose chunks do not tile a tensor it was given
    (the volume and overlap check of its ``_validate_global_plan``); :func:`verify_coverage`
    also catches what the planner cannot see (a tensor no rank offered, a chunk without bytes)
    and checks the file actually on disk.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.save(sharded.state, storage_writer=dcp.FileSystemWriter(str(directory)),
                     planner=BoxSavePlanner(sharded.boxes, sharded.expected), no_dist=_no_dist())
    except CheckpointException as exc:
        causes = "; ".join(f"rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                           for rank, err in sorted(exc.failures.items()))
        hint = (" -- it failed the exactly-once check: the ranks' shards do not tile a tensor"
                if "invalid fill" in causes or "overlap" in causes.lower() else "")
        raise CheckpointError(f"saving checkpoint {directory} failed{hint}. {causes}") from exc
    metadata = read_metadata(directory)
    verify_coverage(metadata, sharded.expected, str(directory))
    return metadata


def load_model_and_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                             mesh: ParallelMesh) -> None:
    """Collective over every rank: read this rank's slices of a checkpoint written at any layout."""
    metadata = read_metadata(directory)
    model_only = build_state(model, None, mesh)
    check_fits(metadata, model_only.expected, str(directory), model_only.elsewhere)  # model first: clearer
    params = _named_params(model)
    slots = _optim_slots(metadata, params, model_only.elsewhere) if optimizer is not None else None
    sharded = build_state(model, optimizer, mesh, optim_slots=slots)
    check_fits(metadata, sharded.expected, str(directory), sharded.elsewhere)
    if optimizer is not None and len(optimizer.param_groups) != _count_groups(metadata):
        raise CheckpointError(f"checkpoint {directory} has {_count_groups(metadata)} optimizer param groups, "
                              f"the optimizer {len(optimizer.param_groups)}; was it written with another config?")
    if optimizer is not None:
        sharded.state[OPTIM]["param_groups"] = _restorable_groups(sharded.state[OPTIM]["param_groups"], metadata)
    with _quiet_single_process():
        dcp.load(sharded.state, storage_reader=dcp.FileSystemReader(str(directory)),
                 planner=BoxLoadPlanner(sharded.boxes), no_dist=_no_dist())

    # DCP filled the sources in place; load_state_dict (not only that copy) so modules' load
    # hooks run.
    model.load_state_dict({name: sharded.sources[f"{MODEL}.{name}"] for name in sharded.state[MODEL]})
    if optimizer is None:
        return
    loaded = sharded.state[OPTIM]
    optimizer.state.clear()
    for fqn, slot_values in loaded["state"].items():
        param = params[fqn]
        optimizer.state[param] = {slot: sharded.sources[f"{OPTIM}.state.{fqn}.{slot}"] for slot in slot_values}
    for group, saved in zip(optimizer.param_groups, loaded["param_groups"]):
        group.update(saved)


IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
"""Param-group keys that choose how torch's optimizers compute, not what: a resumed optimizer
keeps its own (train.optimizer_impl may differ from the run that wrote the checkpoint)."""


def _restorable_groups(groups: list[dict], metadata: Metadata) -> list[dict]:
    """The param-group entries to read back: the hyper-parameters the checkpoint holds. Keys it
    lacks (another optimizer wrote it, or an older torch without a newer AdamW key) keep the
    optimizer's current values, and so do the implementation keys."""
    prefix = f"{OPTIM}.param_groups."
    stored = {key[len(prefix):] for key in metadata.state_dict_metadata if key.startswith(prefix)}
    return [{k: v for k, v in group.items() if f"{i}.{k}" in stored and k not in IMPLEMENTATION_KEYS}
            for i, group in enumerate(groups)]


def _count_groups(metadata: Metadata) -> int:
    prefix = f"{OPTIM}.param_groups."
    indices = {key[len(prefix):].split(".", 1)[0] for key in metadata.state_dict_metadata if key.startswith(prefix)}
    return len(indices)
