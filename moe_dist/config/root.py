"""The whole config tree."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from moe_dist.config.errors import require
from moe_dist.config.model import ModelConfig
from moe_dist.config.moe import MoEConfig
from moe_dist.config.run import (CheckpointConfig, DataConfig, LogConfig, ParallelConfig, TrainConfig,
                                ZeroConfig)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def __post_init__(self) -> None:
        require(self.data.seq_len <= self.model.max_seq_len,
                 f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                 f"({self.model.max_seq_len}); lower seq_len or raise max_seq_len")
        if self.model.arch == "stratified" and self.model.stratified.second_expert == "sampling":
            require(self.moe.router.top_k == 2,
                     f"model.stratified.second_expert=sampling samples the second of two experts, but "
                     f"moe.router.top_k is {self.moe.router.top_k}; set moe.router.top_k=2 or "
                     "model.stratified.second_expert=top2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
