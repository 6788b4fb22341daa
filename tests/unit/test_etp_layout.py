"""Expert tensor parallelism's layout arithmetic, without processes: which FFN columns an etp rank
holds (``param_tags.etp_blocks`` / ``take_etp_shard``), the checkpoint boxes they become
(``checkpoint.ShardSpec.boxes``), and apply_ep's refusal of an FFN dim etp does not divide."""

import pytest
import torch

from moe_dist.config import MoEConfig, ModelConfig
from moe_dist.distributed.checkpoint import ShardSpec
from moe_dist.distributed.mesh import MeshLayout, ParallelMesh
from moe_dist.distributed.param_tags import etp_blocks, take_etp_shard
from moe_dist.models.expert_parallel import apply_ep
from moe_dist.models.transformer import Transformer


def test_etp_blocks_split_each_fused_part_alone():
    assert etp_blocks(16, 2, 0, 2) == [(0, 4), (8, 4)]  # gate 0-3, up 0-3 of F = 8
    assert etp_blocks(16, 2, 1, 2) == [(4, 4), (12, 4)]
    assert etp_blocks(12, 1, 2, 3) == [(8, 4)]  # w2's F rows, etp 3
    with pytest.raises(ValueError, match="does not split into 2 part"):
        etp_blocks(10, 2, 0, 2)


def test_boxes_of_every_ep_x_etp_rank_tile_w13_exactly_once():
    full = torch.arange(4 * 3 * 16, dtype=torch.float32).view(4, 3, 16)  # [E, D, 2F], F = 8
    seen = torch.zeros_like(full)
    for ep_rank in range(2):
        for etp_rank in range(2):
            local = take_etp_shard(full[2 * ep_rank:2 * ep_rank + 2], 2, 2, etp_rank, 2)
            spec = ShardSpec("ep", 0, ep_rank, 2, etp=(2, 2, etp_rank, 2))
            assert spec.global_shape(local.shape) == (4, 3, 16)
            for offset, view in spec.boxes(local):
                box = (slice(offset[0], offset[0] + view.shape[0]), slice(None),
                       slice(offset[2], offset[2] + view.shape[2]))
                torch.testing.assert_close(view, full[box])
                seen[box] += 1
    assert (seen == 1).all()
    # (ep 0, etp 1) holds gate columns 4-7 and up columns 12-15 of experts 0-1
    torch.testing.assert_close(take_etp_shard(full[:2], 2, 2, 1, 2),
                               torch.cat([full[:2, :, 4:8], full[:2, :, 12:16]], 2))


def test_apply_ep_refuses_an_ffn_dim_etp_does_not_divide():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=8),
                        MoEConfig(num_experts=4, expert_ffn_dim=96))
    mesh = ParallelMesh(layout=MeshLayout(world_size=5, dp=5, tp=1, ep=1, etp=5), rank=0)
    with pytest.raises(ValueError, match=r"FFN dim \(96\) must be divisible by parallel.etp \(5\)"):
        apply_ep(model, mesh)
