"""ParallelMesh on 4 gloo ranks: the real process groups match the documented layout."""

from __future__ import annotations

import pytest
from harness import run_distributed

from moe_dist.config import ConfigError, ParallelConfig
from moe_dist.distributed.mesh import build_mesh

# (dp, tp, ep, etp) -> {dim: the group of each rank 0..3}; None marks a degree-1 (absent) group.
EXPECTED = {
    (2, 2, 2, 1): {"dp": [[0, 2], [1, 3], [0, 2], [1, 3]], "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
                   "ep": [[0, 1], [0, 1], [2, 3], [2, 3]], "edp": [[0, 2], [1, 3], [0, 2], [1, 3]],
                   "etp": None},
    (4, 1, 4, 1): {"dp": [[0, 1, 2, 3]] * 4, "tp": None, "ep": [[0, 1, 2, 3]] * 4, "edp": None,
                   "etp": None},
    (4, 1, 2, 1): {"dp": [[0, 1, 2, 3]] * 4, "tp": None, "ep": [[0, 1], [0, 1], [2, 3], [2, 3]],
                   "edp": [[0, 2], [1, 3], [0, 2], [1, 3]], "etp": None},
    (2, 2, 4, 1): {"dp": [[0, 2], [1, 3], [0, 2], [1, 3]], "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
                   "ep": [[0, 1, 2, 3]] * 4, "edp": None, "etp": None},
    (2, 2, 2, 2): {"dp": [[0, 2], [1, 3], [0, 2], [1, 3]], "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
                   "ep": [[0, 2], [1, 3], [0, 2], [1, 3]], "edp": None,
                   "etp": [[0, 1], [0, 1], [2, 3], [2, 3]]},
}


def _build_all(rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from moe_dist.distributed import comms

    seen = {}
    for dp, tp, ep, etp in EXPECTED:
        mesh = build_mesh(ParallelConfig(dp=dp, tp=tp, ep=ep, etp=etp), world_size, "cpu")
        groups = {}
        for dim in ("dp", "tp", "ep", "edp", "etp"):
            pg = getattr(mesh, f"{dim}_group")
            groups[dim] = None if pg is None else dist.get_process_group_ranks(pg)
            size, pos = getattr(mesh, f"{dim}_size"), getattr(mesh, f"{dim}_rank")
            ranks = mesh.group_ranks(dim)
            assert size == len(ranks) and ranks[pos] == rank, (dim, size, pos, ranks)
        assert mesh.dense_grad_group is mesh.dp_group and mesh.expert_grad_group is mesh.edp_group
        # The ep group really communicates: sum of global ranks over it.
        t = torch.tensor([float(rank)])
        comms.all_reduce(t, "sum", mesh.ep_group)
        groups["ep_sum"] = t.item()
        seen[(dp, tp, ep, etp)] = groups
    # A bad size fails on every rank before any collective (no hang, same message).
    try:
        build_mesh(ParallelConfig(tp=3), world_size, "cpu")
    except ConfigError as exc:
        seen["error"] = str(exc)
    return seen


@pytest.fixture(scope="module")
def observed() -> list[dict]:
    return run_distributed(_build_all, 4, timeout=60)


@pytest.mark.parametrize("dims", list(EXPECTED))
def test_mesh_groups_world4(observed, dims):
    for rank in range(4):
        got = observed[rank][dims]
        for dim, per_rank in EXPECTED[dims].items():
            assert got[dim] == (None if per_rank is None else per_rank[rank]), (dims, dim, rank)
        ep_ranks = EXPECTED[dims]["ep"][rank] if EXPECTED[dims]["ep"] else [rank]
        assert got["ep_sum"] == sum(ep_ranks)


def test_bad_mesh_fails_on_every_rank(observed):
    assert all("parallel.tp (3)" in observed[r]["error"] for r in range(4))
