"""A checkpoint's config and whole model weights, in one process: what ``moe-dist export`` and
``model.init_from`` read.

Both engines' checkpoints are read, at any parallel layout they were written with:

* native (``trainer.pt`` + DCP files): the global tensors, through
  :func:`moe_dist.distributed.checkpoint_read.read_model_tensors`;
* DeepSpeed (``mp_rank_00_model_states.pt``): the module state dict DeepSpeed wrote from rank 0,
  whose expert tensors are rank 0's block only when ``parallel.ep > 1``; the blocks of every ep
  rank are in ``experts_ep{r:03d}.pt`` (``train/engines/deepspeed.py``) and are concatenated in
  ep-rank order. These are the module's weights as trained (bf16 under ``train.dtype=bf16``,
  where DeepSpeed's fp32 master copy stays in its optimizer shards).

The checkpoint is verified against its manifest first. Its ``config.yaml`` (written at save
time, ``model.vocab_size`` resolved) describes the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from moe_dist.config import Config, ConfigError, config_from_dict
from moe_dist.distributed.checkpoint import CheckpointError
from moe_dist.train import checkpoint as ckpt

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the module's state (mp rank 0)
EXPERT_SHARDS = "experts_ep*.pt"


def find_checkpoint(path: Path) -> Path:
    """``path`` if it is a checkpoint directory, else the newest checkpoint of the run directory
    ``path`` that verifies; a ConfigError when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; name a run directory (runs/NAME) or one of its checkpoints "
                          "(runs/NAME/checkpoints/step_XXXXXXXX)")
    if (path / "manifest.json").is_file():
        ckpt.verify_checkpoint(path)
        return path
    found = ckpt.resolve_resume(path, "auto", warn=None) if (path / ckpt.CHECKPOINT_DIR).is_dir() else None
    if found is None:
        raise ConfigError(f"{path} holds no checkpoint: expected a run directory with checkpoints/step_XXXXXXXX "
                          "or a checkpoint directory (with manifest.json)")
    return found


def read_config(directory: Path) -> Config:
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} lacks config.yaml, which describes its model")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def engine_of(directory: Path) -> str:
    """'native' or 'deepspeed': which engine wrote the checkpoint."""
    if (Path(directory) / DEEPSPEED_MODEL_FILE).is_file():
        return "deepspeed"
    if (Path(directory) / ".metadata").is_file():
        return "native"
    raise CheckpointError(f"checkpoint {directory} holds neither DCP files (.metadata) nor a DeepSpeed "
                          f"{DEEPSPEED_MODEL_FILE}; it was not written by moe_dist")


def read_checkpoint(path: Path) -> tuple[Path, Config, dict[str, torch.Tensor]]:
    """(checkpoint directory, its config, the single-process model's state dict)."""
    directory = find_checkpoint(path)
    cfg = read_config(directory)
    if engine_of(directory) == "deepspeed":
        return directory, cfg, _read_deepspeed(directory)
    from moe_dist.distributed.checkpoint_read import read_model_tensors

    return directory, cfg, read_model_tensors(directory)


def _read_deepspeed(directory: Path) -> dict[str, torch.Tensor]:
    saved = ckpt.load_file(directory, DEEPSPEED_MODEL_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        raise CheckpointError(f"checkpoint {directory}: {DEEPSPEED_MODEL_FILE} has no 'module' state dict")
    state = {name: tensor.detach().cpu() for name, tensor in saved["module"].items()}
    shards = sorted(Path(directory).glob(EXPERT_SHARDS))
    if not shards:
        return state  # ep = 1: the module holds every expert
    blocks = [ckpt.load_file(directory, shard.name) for shard in shards]
    ep_size = blocks[0]["ep_size"]
    if sorted(block["ep_rank"] for block in blocks) != list(range(ep_size)):
        raise CheckpointError(f"checkpoint {directory}: expert shards of ep ranks "
                              f"{sorted(block['ep_rank'] for block in blocks)} found, expected 0..{ep_size - 1}")
    blocks.sort(key=lambda block: block["ep_rank"])
    for name in blocks[0]["experts"]:
        state[name] = torch.cat([block["experts"][name].cpu() for block in blocks], dim=0)
    return state
