"""ParallelMesh: one set of ranks seen two ways, dense ``dp x tp`` and MoE ``edp x ep x etp``.

Attention, dense MLPs, embeddings and the head see the **dense view** ``dp x tp`` with tp
innermost: ``rank = dp_rank * tp + tp_rank``. MoE layers see the same ranks as the **MoE view**
``edp x ep x etp`` with etp innermost: ``rank = (edp_rank * ep + ep_rank) * etp + etp_rank``,
where ``edp = world / (ep * etp)``. This is Megatron-core's "MoE parallel folding": the expert
dimension is laid over the flat rank order independently of tp, so ep may span tp ranks (with
sequence parallelism each tp rank routes its own token slice) as well as dp ranks.

Worked example, world 4, ``dp=2, tp=2, ep=4, etp=1`` (see docs/parallelism.md for more)::

    dense view            MoE view
    tp groups [0,1] [2,3]  ep groups  [0,1,2,3]        -> rank r holds experts 2r, 2r+1 of 8
    dp groups [0,2] [1,3]  edp groups [0] [1] [2] [3]  -> size 1: expert grads need no reduce

Gradients: a dense parameter is replicated over its dp group (``dense_grad_group``); an expert
parameter over its edp group (``expert_grad_group``). A degree-1 group is ``None`` (STYLE §2).

:class:`MeshLayout` is the pure rank arithmetic (usable without processes, e.g. ``--dry-run``);
:func:`build_mesh` validates, then builds the torch DeviceMeshes that match it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moe_dist.config import Config, ConfigError, ParallelConfig, resolve_dp, validate

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

DENSE_DIMS = ("dp", "tp")
MOE_DIMS = ("edp", "ep", "etp")


@dataclass(frozen=True)
class MeshLayout:
    """Rank arithmetic of both views; no processes, no torch.distributed."""

    world_size: int
    dp: int
    tp: int
    ep: int
    etp: int

    def __post_init__(self) -> None:
        if self.dp * self.tp != self.world_size:
            raise ConfigError(f"parallel.dp ({self.dp}) x parallel.tp ({self.tp}) = {self.dp * self.tp} "
                              f"must equal the world size ({self.world_size}); set dp=-1 to infer it")
        if self.world_size % (self.ep * self.etp) != 0:
            raise ConfigError(f"parallel.ep ({self.ep}) x parallel.etp ({self.etp}) = {self.ep * self.etp} "
                              f"must divide the world size ({self.world_size}); use ep in "
                              f"{[d for d in range(1, self.world_size + 1) if self.world_size % (d * self.etp) == 0]}")

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> MeshLayout:
        return cls(world_size=world_size, dp=resolve_dp(parallel, world_size), tp=parallel.tp,
                   ep=parallel.ep, etp=parallel.etp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.ep * self.etp)

    def shape(self, view: str) -> tuple[int, ...]:
        return (self.dp, self.tp) if view == "dense" else (self.edp, self.ep, self.etp)

    def size(self, dim: str) -> int:
        return {"dp": self.dp, "tp": self.tp, "edp": self.edp, "ep": self.ep, "etp": self.etp}[dim]

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of `rank` in both views, e.g. {'dp': 1, 'tp': 0, 'edp': 0, 'ep': 2, 'etp': 0}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        moe_block = self.ep * self.etp
        return {"dp": rank // self.tp, "tp": rank % self.tp,
                "edp": rank // moe_block, "ep": (rank % moe_block) // self.etp,
                "etp": rank % self.etp}

    def groups(self, dim: str) -> list[list[int]]:
        """Every group along `dim`: ranks that differ only in their `dim` coordinate."""
        names = DENSE_DIMS if dim in DENSE_DIMS else MOE_DIMS
        if dim not in names:
            raise ValueError(f"unknown mesh dim {dim!r}; use one of {DENSE_DIMS + MOE_DIMS}")
        shape = self.shape("dense" if dim in DENSE_DIMS else "moe")
        axis = names.index(dim)
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        others = [range(n) if i != axis else range(1) for i, n in enumerate(shape)]
        out = []
        for base in itertools.product(*others):
            start = sum(c * s for c, s in zip(base, strides))
            out.append([start + j * strides[axis] for j in range(shape[axis])])
        return sorted(out)

    def group_of(self, dim: str, rank: int) -> list[int]:
        return next(g for g in self.groups(dim) if rank in g)

    def local_experts(self, rank: int, num_experts: int) -> range:
        """Global expert ids held by `rank`: a contiguous block of num_experts / ep."""
        if num_experts % self.ep != 0:
            raise ConfigError(f"moe.num_experts ({num_experts}) must be divisible by parallel.ep ({self.ep})")
        per_rank = num_experts // self.ep
        ep_rank = self.coords(rank)["ep"]
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def describe(self, num_experts: int | None = None) -> str:
        """A readable rank layout: the groups of each dim and what each rank holds."""
        def fmt(groups: list[list[int]]) -> str:
            return " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)

        lines = [f"world {self.world_size} = dp {self.dp} x tp {self.tp} (dense view, tp innermost)"
                 f" = edp {self.edp} x ep {self.ep} x etp {self.etp} (MoE view, etp innermost)"]
        for dim in DENSE_DIMS + MOE_DIMS:
            lines.append(f"  {dim:>3} groups: {fmt(self.groups(dim))}")
        for rank in range(self.world_size):
            c = self.coords(rank)
            line = (f"  rank {rank}: dp {c['dp']} tp {c['tp']} | edp {c['edp']} ep {c['ep']} "
                    f"etp {c['etp']}")
            if num_experts:
                held = self.local_experts(rank, num_experts)
                shard = f", expert shard {c['etp']}/{self.etp}" if self.etp > 1 else ""
                line += f" | experts {held.start}-{held.stop - 1} of {num_experts}{shard}"
            lines.append(line)
        return "\n".join(lines)


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's view of the job: sizes, ranks and process groups of every parallel dim.

    Groups of degree 1 are ``None``; callers take the local path then. Passed explicitly to the
    model wrappers, the trainer and the checkpointer; never stored in a module global.
    """

    layout: MeshLayout
    rank: int
    dense_mesh: DeviceMesh | None = field(default=None, repr=False)
    """torch DeviceMesh with dims ('dp', 'tp'); None for a single process."""
    moe_mesh: DeviceMesh | None = field(default=None, repr=False)
    """torch DeviceMesh with dims ('edp', 'ep', 'etp'); None for a single process."""
    dp_group: ProcessGroup | None = field(default=None, repr=False)
    tp_group: ProcessGroup | None = field(default=None, repr=False)
    ep_group: ProcessGroup | None = field(default=None, repr=False)
    edp_group: ProcessGroup | None = field(default=None, repr=False)
    etp_group: ProcessGroup | None = field(default=None, repr=False)

    @classmethod
    def single(cls) -> ParallelMesh:
        """One process: every size 1, every group None."""
        return cls(layout=MeshLayout(world_size=1, dp=1, tp=1, ep=1, etp=1), rank=0)

    # sizes and ranks -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def _coord(self, dim: str) -> int:
        return self.layout.coords(self.rank)[dim]

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def etp_size(self) -> int:
        return self.layout.etp

    @property
    def edp_size(self) -> int:
        return self.layout.edp

    @property
    def dp_rank(self) -> int:
        return self._coord("dp")

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def ep_rank(self) -> int:
        return self._coord("ep")

    @property
    def etp_rank(self) -> int:
        return self._coord("etp")

    @property
    def edp_rank(self) -> int:
        return self._coord("edp")

    # gradient groups -------------------------------------------------------------------------
    @property
    def dense_grad_group(self) -> ProcessGroup | None:
        """Ranks holding replicas of a dense parameter (the dp group)."""
        return self.dp_group

    @property
    def expert_grad_group(self) -> ProcessGroup | None:
        """Ranks holding replicas of an expert parameter (the expert-data-parallel group)."""
        return self.edp_group

    def group_ranks(self, dim: str) -> list[int]:
        """Global ranks of this rank's group along `dim` (from the layout; [rank] for degree 1)."""
        return self.layout.group_of(dim, self.rank)

    def submesh(self, dim: str) -> DeviceMesh | None:
        """The 1-D DeviceMesh along `dim` (for DTensor users); None when its degree is 1."""
        if self.layout.size(dim) == 1:
            return None
        mesh = self.dense_mesh if dim in DENSE_DIMS else self.moe_mesh
        assert mesh is not None, "a degree > 1 implies a built mesh"
        return mesh[dim]

    def local_experts(self, num_experts: int) -> range:
        return self.layout.local_experts(self.rank, num_experts)

    def describe(self, num_experts: int | None = None) -> str:
        return self.layout.describe(num_experts)


def build_mesh(parallel: ParallelConfig | Config, world_size: int, device_type: str) -> ParallelMesh:
    """Validate, then build both DeviceMesh views over the default process group.

    Pass the whole ``Config`` to run :func:`moe_dist.config.validate` (all cross-section checks)
    or just its ``ParallelConfig`` for the layout checks alone. Validation runs on every rank
    before any collective, so a bad size fails identically everywhere instead of hanging (building
    a DeviceMesh is itself collective). ``world_size`` 1 needs no process group.
    """
    if isinstance(parallel, Config):
        validate(parallel, world_size)
        parallel = parallel.parallel
    layout = MeshLayout.from_config(parallel, world_size)
    if world_size == 1:
        return ParallelMesh.single()

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs the default process group; call "
                           "moe_dist.distributed.launch_env.init_process_group first")
    if dist.get_world_size() != world_size:
        raise ConfigError(f"build_mesh(world_size={world_size}) but the process group has "
                          f"{dist.get_world_size()} ranks; pass dist.get_world_size()")
    rank = dist.get_rank()
    # Collective: every rank creates the same groups in the same order.
    dense = init_device_mesh(device_type, layout.shape("dense"), mesh_dim_names=DENSE_DIMS)
    moe = init_device_mesh(device_type, layout.shape("moe"), mesh_dim_names=MOE_DIMS)

    def group(mesh: DeviceMesh, dim: str) -> ProcessGroup | None:
        if layout.size(dim) == 1:
            return None
        pg = mesh[dim].get_group()
        got = dist.get_process_group_ranks(pg)
        assert got == layout.group_of(dim, rank), f"{dim} group {got} != layout {layout.group_of(dim, rank)}"
        return pg

    return ParallelMesh(layout=layout, rank=rank, dense_mesh=dense, moe_mesh=moe,
                        dp_group=group(dense, "dp"), tp_group=group(dense, "tp"),
                        ep_group=group(moe, "ep"), edp_group=group(moe, "edp"),
                        etp_group=group(moe, "etp"))
