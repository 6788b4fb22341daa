"""MeshLayout rank arithmetic (no processes): exact group lists of both views."""

from __future__ import annotations

import pytest

from moe_dist.config import Config, ConfigError, ParallelConfig
from moe_dist.distributed.mesh import MeshLayout, ParallelMesh, build_mesh

S = [[0], [1], [2], [3]]

# (dp, tp, ep, etp) on world 4 -> expected groups per dim
CASES = {
    (2, 2, 2, 1): {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]],
                   "ep": [[0, 1], [2, 3]], "edp": [[0, 2], [1, 3]], "etp": S},
    (4, 1, 4, 1): {"tp": S, "dp": [[0, 1, 2, 3]], "ep": [[0, 1, 2, 3]], "edp": S, "etp": S},
    (4, 1, 2, 1): {"tp": S, "dp": [[0, 1, 2, 3]], "ep": [[0, 1], [2, 3]], "edp": [[0, 2], [1, 3]],
                   "etp": S},
    (2, 2, 4, 1): {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "ep": [[0, 1, 2, 3]], "edp": S,
                   "etp": S},
    (2, 2, 2, 2): {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "ep": [[0, 2], [1, 3]], "edp": S,
                   "etp": [[0, 1], [2, 3]]},
}


@pytest.mark.parametrize("dims", list(CASES))
def test_layout_groups_world4(dims):
    dp, tp, ep, etp = dims
    layout = MeshLayout(world_size=4, dp=dp, tp=tp, ep=ep, etp=etp)
    for dim, groups in CASES[dims].items():
        assert layout.groups(dim) == groups, dim


def test_dp2_ep2_world2_and_coords():
    layout = MeshLayout(world_size=2, dp=2, tp=1, ep=2, etp=1)
    assert layout.groups("dp") == [[0, 1]] and layout.groups("ep") == [[0, 1]]
    assert layout.groups("edp") == [[0], [1]]
    assert layout.coords(1) == {"dp": 1, "tp": 0, "edp": 0, "ep": 1, "etp": 0}


def test_local_experts_and_describe():
    layout = MeshLayout(world_size=4, dp=2, tp=2, ep=4, etp=1)
    assert [list(layout.local_experts(r, 8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    text = layout.describe(num_experts=8)
    assert "ep groups: [0,1,2,3]" in text
    assert "tp groups: [0,1] [2,3]" in text
    assert "rank 3: dp 1 tp 1 | edp 0 ep 3 etp 0 | experts 6-7 of 8" in text


def test_layout_errors():
    with pytest.raises(ConfigError, match=r"parallel.dp \(3\) x parallel.tp \(1\) = 3 must equal"):
        MeshLayout(world_size=4, dp=3, tp=1, ep=1, etp=1)
    with pytest.raises(ConfigError, match=r"parallel.ep \(3\) x parallel.etp \(1\)"):
        MeshLayout(world_size=4, dp=4, tp=1, ep=3, etp=1)


def test_build_mesh_validates_before_any_collective():
    # No process group exists here: the config error must come first.
    cfg = Config(parallel=ParallelConfig(ep=3))
    with pytest.raises(ConfigError, match=r"moe.num_experts \(8\) must be divisible by parallel.ep \(3\)|"
                                          r"parallel.ep \(3\)"):
        build_mesh(cfg, 4, "cpu")
    with pytest.raises(ConfigError, match=r"parallel.tp \(3\)"):
        build_mesh(ParallelConfig(tp=3), 4, "cpu")


def test_single():
    mesh = build_mesh(ParallelConfig(), 1, "cpu")
    assert mesh == ParallelMesh.single()
    assert (mesh.dp_size, mesh.ep_size, mesh.edp_size, mesh.ep_rank) == (1, 1, 1, 0)
    assert mesh.ep_group is None and mesh.dense_grad_group is None and mesh.submesh("ep") is None
    assert list(mesh.local_experts(4)) == [0, 1, 2, 3]
