"""``parallel.fsdp`` combinations that are refused by ``validate``, before any process group."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from moe_dist.config import ConfigError, load_config, validate
from moe_dist.distributed.launch_env import LaunchEnv


def _env(world_size: int) -> LaunchEnv:
    return LaunchEnv(rank=0, world_size=world_size, local_rank=0, local_world_size=world_size, node_rank=0,
                     master_addr="127.0.0.1", master_port=29999, launcher="torchrun")


def test_fsdp_with_deepspeed_is_refused_before_any_process_group():
    from moe_dist.train.runtime import build_runtime

    cfg = load_config(None, ["parallel.fsdp=true", "train.engine=deepspeed", "zero.stage=2"])
    with pytest.raises(ConfigError, match=r"^parallel\.fsdp=true with train\.engine=deepspeed: .* Use "
                                          r"train\.engine=native, or parallel\.fsdp=false with zero\.stage=1/2$"):
        build_runtime(cfg, _env(2))
    assert not dist.is_initialized(), "the config error must come before init_process_group"


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=2"], r"^parallel\.fsdp=true with parallel\.tp \(2\) > 1 is not supported yet; use tp=1"),
    (["model.arch=peer"], r"^parallel\.fsdp=true with model\.arch=peer: .*use model\.arch=transformer"),
    (["moe.router.type=top_any", "moe.router.adaptive.enabled=true"],
     r"^parallel\.fsdp=true with moe\.router\.adaptive\.enabled: .*set moe\.router\.adaptive\.enabled=false"),
])
def test_fsdp_refuses_what_it_does_not_shard(overrides, message):
    cfg = load_config(None, ["parallel.fsdp=true", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 4)
    validate(load_config(None, ["parallel.fsdp=true", "parallel.ep=2"]), 4)  # the supported case passes
