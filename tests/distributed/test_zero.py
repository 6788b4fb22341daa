"""Shared machinery of the DeepSpeed ZeRO tests: the tiny MoE model of ``parity.py`` trained for a
few steps through ``moe_dist.distributed.zero.build_engine`` on gloo ranks, and the same steps on
one process with the native engine's optimizer, scheduler and clipping (its exact reference, see
test_ep_parity.py).

DeepSpeed's first ``init_distributed`` on CPU JIT-builds a shared-memory op (about 40 s, see
FEASIBILITY §4) that training never uses; :func:`skip_shm_build` stubs the builder in the test
process only, through ``sys.modules`` (``deepspeed.comm`` re-exports ``torch``, so ``import
deepspeed.comm.torch as m`` would bind torch itself).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

import torch

from moe_dist.config import Config, ParallelConfig, TrainConfig, ZeroConfig
from harness import run_distributed
from parity import MAX_NORM, MICRO_BATCH, STEPS, Case, build_model, global_batches, is_expert_name, micro_loss

LR = 1e-2


@dataclass(frozen=True)
class ZeroCase:
    name: str
    stage: int
    dp: int
    ep: int
    num_experts: int = 4
    accum: int = 1

    @property
    def model_case(self) -> Case:
        return Case(self.name, dp=self.dp, ep=self.ep, num_experts=self.num_experts, accum=self.accum)

    def config(self) -> Config:
        train = TrainConfig(steps=STEPS, global_batch_size=MICRO_BATCH * self.dp * self.accum,
                            micro_batch_size=MICRO_BATCH, lr=LR, warmup_steps=1, min_lr_ratio=0.1,
                            weight_decay=0.1, grad_clip=MAX_NORM, engine="deepspeed", device="cpu")
        return Config(parallel=ParallelConfig(dp=self.dp, tp=1, ep=self.ep), train=train,
                      zero=ZeroConfig(stage=self.stage, overlap_comm=True, bucket_size=500))


@dataclass
class ZeroRecord:
    losses: list[list[float]] = field(default_factory=list)  # [step][micro]
    norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)  # name -> numpy array after the last step
    expert_range: tuple[int, int] = (0, 0)
    moe_partition_ranks: list[list[int]] = field(default_factory=list)
    """Ranks of the process group ZeRO partitions each MoE optimizer group over."""
    dense_partition_ranks: list[list[int]] = field(default_factory=list)


def skip_shm_build() -> None:
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def native_reference(case: ZeroCase) -> ZeroRecord:
    """One process, the whole global batch, moe_dist's AdamW groups + warm-up/cosine + clipping."""
    from moe_dist.train.optim import build_optimizer, build_scheduler

    cfg = case.config()
    model = build_model(case.model_case)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    batches = global_batches(case.model_case)
    n_micro = case.dp * case.accum
    record = ZeroRecord()
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for j in range(n_micro):
            loss = micro_loss(model, batches[step, j])
            (loss / n_micro).backward()
            losses.append(loss.item())
        record.losses.append(losses)
        record.norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=False).item())
        record.lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    record.params = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    return record


def _group_ranks(group) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(group)


def run_zero_rank(rank: int, world_size: int, case: ZeroCase, meshes: dict) -> ZeroRecord:
    """One rank: apply_ep + DeepSpeed engine, STEPS steps on this rank's micro-batches."""
    from moe_dist.distributed.expert_parallel import apply_ep
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.distributed.zero import build_engine

    cfg = case.config()
    if case.ep not in meshes:  # one mesh per ep: DeepSpeed's registry keeps the first groups by name
        meshes[case.ep] = build_mesh(cfg.parallel, world_size, "cpu")
    mesh = meshes[case.ep]
    model = build_model(case.model_case)
    apply_ep(model, mesh)
    engine = build_engine(model, cfg, mesh, bf16=False, backend="gloo", local_rank=rank)
    batches = global_batches(case.model_case)
    local = mesh.local_experts(case.num_experts)
    record = ZeroRecord(expert_range=(local.start, local.stop))
    for group, is_moe in zip(engine.optimizer.real_dp_process_group, engine.optimizer.is_moe_param_group):
        (record.moe_partition_ranks if is_moe else record.dense_partition_ranks).append(_group_ranks(group))
    for step in range(STEPS):
        losses = []
        record.lrs.append(engine.optimizer.param_groups[0]["lr"])
        for m in range(case.accum):
            loss = micro_loss(engine, batches[step, m * case.dp + mesh.dp_rank])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        record.losses.append(losses)
        record.norms.append(float(engine.get_global_grad_norm()))
    record.params = {n: p.detach().clone().numpy() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return record


def run_zero_cases(rank: int, world_size: int, cases: list[ZeroCase]) -> list[ZeroRecord]:
    """Spawned-process entry: every case in order, one process start for all."""
    skip_shm_build()
    meshes: dict = {}
    return [run_zero_rank(rank, world_size, case, meshes) for case in cases]


def check_zero_against_native(case: ZeroCase, ranks: list[ZeroRecord], ref: ZeroRecord, world_size: int,
                              rtol: float, atol: float) -> float:
    """Every rank's micro losses, grad norms, learning rates and final parameters (expert shards
    against the slice of the reference). Returns the largest absolute loss difference."""
    from moe_dist.distributed.mesh import MeshLayout

    layout = MeshLayout(world_size=world_size, dp=case.dp, tp=1, ep=case.ep, etp=1)
    worst = 0.0
    for rank, rec in enumerate(ranks):
        dp_rank = layout.coords(rank)["dp"]
        start, stop = rec.expert_range
        for step in range(STEPS):
            got = torch.tensor(rec.losses[step])
            want = torch.tensor([ref.losses[step][m * case.dp + dp_rank] for m in range(case.accum)])
            worst = max(worst, float((got - want).abs().max()))
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{case.name} rank {rank} step {step} loss: {m}")
            torch.testing.assert_close(rec.norms[step], ref.norms[step], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{case.name} rank {rank} step {step} grad norm: {m}")
            assert rec.lrs[step] == ref.lrs[step], f"{case.name} step {step}: lr {rec.lrs[step]} != {ref.lrs[step]}"
        assert set(rec.params) == set(ref.params), f"{case.name}: parameter names differ"
        for name, value in rec.params.items():
            want_param = torch.from_numpy(ref.params[name])
            if is_expert_name(name):
                want_param = want_param[start:stop]
            torch.testing.assert_close(torch.from_numpy(value), want_param, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{case.name} rank {rank} final {name}: {m}")
    return worst


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

WORLD2 = [
    ZeroCase("zero1_ep2", stage=1, dp=2, ep=2),
    ZeroCase("zero2_ep2_accum2", stage=2, dp=2, ep=2, accum=2),
]


def test_zero_matches_native_world2():
    results = run_distributed(run_zero_cases, 2, WORLD2, timeout=120)
    for i, case in enumerate(WORLD2):
        ranks = [per_rank[i] for per_rank in results]
        worst = check_zero_against_native(case, ranks, native_reference(case), 2, rtol=1e-4, atol=1e-5)
        print(f"{case.name}: max |loss diff| {worst:.2e}")
        for rec in ranks:
            assert rec.moe_partition_ranks == [[rank] for rank in [ranks.index(rec)]]
