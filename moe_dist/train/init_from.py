"""``model.init_from``: start a run from another model's weights instead of a random init.

The source is a moe_dist checkpoint (a run directory, whose newest verified checkpoint is
taken, or a checkpoint directory; either engine) or a local Hugging Face directory holding a
dense Llama-style model (``config.json`` + ``*.safetensors``). Tensors of the same name and shape
are copied; a dense MLP meeting an MoE layer is upcycled (``models/upcycle.py``,
``model.upcycle_mode``); anything else is refused with the list of mismatches. Every rank reads
the source on its own before the model is parallelized, so each slices the same full weights.

Only the weights come over: the optimizer, the step and the data position start afresh (use
``checkpoint.resume`` to continue a run).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from moe_dist.config import Config, ConfigError
from moe_dist.models.hf_format import check_llama_config, llama_to_state
from moe_dist.models.upcycle import initial_state
from moe_dist.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``directory`` (sharded or not)."""
    try:
        from safetensors.torch import load_file
    except ModuleNotFoundError as exc:
        raise ConfigError("reading a Hugging Face directory needs the 'safetensors' package: "
                          "pip install -e '.[hf]'") from exc
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def read_hf_llama(directory: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """A dense HF Llama as moe_dist's dense state dict, after checking it fits ``cfg.model``."""
    hf_config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    check_llama_config(hf_config, cfg.model, str(directory))
    return llama_to_state(read_safetensors(directory), cfg.model.n_layers, cfg.model.n_heads,
                          cfg.model.tie_embeddings)


def source_state(cfg: Config) -> tuple[str, dict[str, torch.Tensor]]:
    """(a description of the source, its weights under moe_dist's single-process names)."""
    path = Path(cfg.model.init_from)
    if not path.exists():
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: no such directory; name a moe_dist run or "
                          "checkpoint directory, or a local Hugging Face model directory")
    if is_hf_directory(path):
        return f"Hugging Face model {path}", read_hf_llama(path, cfg)
    from moe_dist.train.checkpoint_reader import read_checkpoint

    directory, _, state = read_checkpoint(path)
    return f"checkpoint {directory}", state


def resumes(cfg: Config, run_dir: Path | None) -> bool:
    """Whether the run will load a checkpoint of its own (which then supplies the weights)."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return False
    return resume != "auto" or (run_dir is not None and bool(ckpt.list_checkpoints(run_dir)))


@torch.no_grad()
def initialize_from(model: nn.Module, cfg: Config, run_dir: Path | None = None) -> None:
    """Overwrite ``model``'s freshly initialised weights from ``cfg.model.init_from``. A no-op
    when it is empty, or when the run resumes from its own checkpoint (``run_dir``), whose
    weights win. Call before the model is parallelized."""
    if not cfg.model.init_from:
        return
    if resumes(cfg, run_dir):
        logger.info("model.init_from is not read: the run resumes from its own checkpoint")
        return
    description, source = source_state(cfg)
    state = initial_state(model, source, cfg.moe, cfg.model.upcycle_mode, cfg.model.upcycle_noise_std,
                          seed=cfg.train.seed, source_name=description)
    model.load_state_dict(state)
    logger.info("initialised the model from %s (upcycle_mode=%s)", description, cfg.model.upcycle_mode)
