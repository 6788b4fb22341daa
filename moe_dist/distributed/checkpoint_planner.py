"""DCP planners for tensors a rank holds as several boxes of the global tensor.

An expert weight under expert tensor parallelism is such a tensor: an etp rank's ``w13`` shard
``[L, D, 2F/etp]`` is its block of the gate and its block of the up projection, two boxes of the
global ``[E, D, 2F]`` (``distributed/checkpoint.py`` says why, ``param_tags.etp_blocks`` where).
DTensor places one box per rank, so these tensors bypass it: the state dict holds the plain local
shard, and ``boxes[key]`` lists ``(global offset, view of the shard)``.

* :class:`BoxSavePlanner` replaces the default write item of each such key (the whole local
  shard at offset 0) by one write item per box, whose data is a contiguous copy of the view.
* :class:`BoxLoadPlanner` replaces its read items by reads into each box, resolved to the view,
  so DCP copies the stored chunks straight into the local shard (which the model or the
  optimizer holds).

Replicas (edp copies) present the same boxes and DCP's coordinator keeps one of each, as for
DTensor shards; its global-plan validation checks that the boxes of all ranks tile the tensor.
Both planners are the default ones when ``boxes`` is empty.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Boxes = dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]
"""Flattened state-dict key -> [(global offset, view of the local shard)]."""


def _view(boxes: Boxes, index: MetadataIndex) -> torch.Tensor:
    offset = tuple(index.offset) if index.offset is not None else None
    for start, view in boxes[index.fqn]:
        if start == offset:
            return view
    raise KeyError(f"{index.fqn} holds no box at offset {offset}")


class BoxSavePlanner(DefaultSavePlanner):
    """:class:`DefaultSavePlanner` that writes the keys of ``boxes`` one chunk per box."""

    def __init__(self, boxes: Boxes, global_shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.boxes, self.global_shapes = boxes, global_shapes

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        boxed = {key for key in self.boxes if key in self.state_dict}
        if not boxed:
            return plan
        items = [item for item in plan.items if item.index.fqn not in boxed]
        for key in sorted(boxed):
            for offset, view in self.boxes[key]:
                chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=view.shape)
                items.append(WriteItem(index=MetadataIndex(key, torch.Size(offset)), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=chunk,
                                                                   properties=TensorProperties.create_from_tensor(view),
                                                                   size=torch.Size(self.global_shapes[key]))))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.index.fqn in self.boxes and write_item.index.fqn in self.state_dict:
            return _view(self.boxes, write_item.index).contiguous().clone()  # own storage, exact bytes
        return super().resolve_data(write_item)


class BoxLoadPlanner(DefaultLoadPlanner):
    """:class:`DefaultLoadPlanner` that reads the keys of ``boxes`` box by box, in place."""

    def __init__(self, boxes: Boxes) -> None:
        super().__init__()
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        boxed = {key for key in self.boxes if key in self.state_dict}
        if not boxed:
            return super().create_local_plan()
        # The default plan would read a boxed key's whole local shard at offset 0 (and refuse its
        # local shape), so it plans the other keys only. Our checkpoints are always written in
        # DCP's current key format: the default's fallback for pre-2.4 keys does not apply.
        others = {key: value for key, value in self.state_dict.items() if key not in boxed}
        plan = create_default_local_load_plan(others, self.metadata, not self.allow_partial_load)
        items = list(plan.items)
        for key in sorted(boxed):
            chunks = [ChunkStorageMetadata(offsets=torch.Size(offset), sizes=view.shape)
                      for offset, view in self.boxes[key]]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return dataclasses.replace(plan, items=items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        if read_item.dest_index.fqn in self.boxes and read_item.dest_index.fqn in self.state_dict:
            return self.transform_tensor(read_item, _view(self.boxes, read_item.dest_index))
        return super().resolve_tensor(read_item)
