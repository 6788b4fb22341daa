"""Read a DCP checkpoint's model tensors whole, in this process alone (no process group, no
collective): for exporting a checkpoint and for initialising a new run from one
(``model.init_from``), whatever layout wrote it and whether or not ``torch.distributed`` is
initialised (every rank of a run reads the file on its own).

The layout: ``moe_dist.distributed.checkpoint`` (global tensors under ``model.<fqn>``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe_dist.distributed.checkpoint import MODEL, read_metadata


def read_model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """``{fqn: global tensor}`` of every model tensor in the DCP checkpoint ``directory`` (the
    single-process model's state dict; no optimizer state)."""
    metadata = read_metadata(directory)
    prefix = f"{MODEL}."
    tensors = {key[len(prefix):]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({MODEL: tensors}, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return tensors
