"""``build_model(model_cfg, moe_cfg)``: the model family that ``model.arch`` names, built for one
device (parallelism is applied afterwards by ``models/parallelize.py``)."""

from __future__ import annotations

from torch import nn

from moe_dist.config import ConfigError, ModelConfig, MoEConfig
from moe_dist.models.hmoe import HMoETransformer
from moe_dist.models.mh_moe import MHMoETransformer
from moe_dist.models.moa import MoATransformer
from moe_dist.models.peer import PEERTransformer
from moe_dist.models.stratified import StratifiedTransformer
from moe_dist.models.switchhead import SwitchHeadTransformer
from moe_dist.models.transformer import Transformer

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "switchhead": SwitchHeadTransformer,
    "peer": PEERTransformer,
    "mh_moe": MHMoETransformer,
    "stratified": StratifiedTransformer,
    "hmoe": HMoETransformer,
    "moa": MoATransformer,
}
"""The research architectures; 'transformer' is the plain decoder LM."""


def build(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> nn.Module:
    """The model named by ``model.arch`` (one of the research architectures)."""
    if model_cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch ({model_cfg.arch!r}) is not a research architecture; use one of "
                          f"{sorted(ARCHITECTURES)} or 'transformer'")
    return ARCHITECTURES[model_cfg.arch](model_cfg, moe_cfg)


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> nn.Module:
    """The model family named by ``model.arch``."""
    if model_cfg.arch == "transformer":
        return Transformer(model_cfg, moe_cfg)
    return build(model_cfg, moe_cfg)
