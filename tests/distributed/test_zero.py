"""Shared machinery of the DeepSpeed ZeRO tests: the tiny MoE model of ``parity.py`` trained for a
few steps through ``moe_dist.train.engines.deepspeed.build_engine`` on gloo ranks, and the same steps on
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
from parity import MAX_NORM, MICRO_BATCH, SEQ_LEN, STEPS, Case, build_model, global_batches, is_expert_name, micro_loss

LR = 1e-2


@dataclass(frozen=True)
class ZeroCase:
    name: str
    stage: int
    dp: int
    ep: int
    num_experts: int = 4
    accum: int = 1
    dense: bool = False
    """A model without MoE layers (the ZeRO-3 case)."""

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


def make_model(case: ZeroCase) -> torch.nn.Module:
    if not case.dense:
        return build_model(case.model_case)
    from moe_dist.config import ModelConfig, MoEConfig
    from moe_dist.models.transformer import Transformer

    torch.manual_seed(1234)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=SEQ_LEN),
                       MoEConfig(num_experts=0))


def step_loss(model: torch.nn.Module, tokens: torch.Tensor, case: ZeroCase) -> torch.Tensor:
    if not case.dense:
        return micro_loss(model, tokens)
    logits = model(tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def skip_shm_build() -> None:
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def native_reference(case: ZeroCase) -> ZeroRecord:
    """One process, the whole global batch, moe_dist's AdamW groups + warm-up/cosine + clipping."""
    from moe_dist.train.optim import build_optimizer, build_scheduler

    cfg = case.config()
    model = make_model(case)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    batches = global_batches(case.model_case)
    n_micro = case.dp * case.accum
    record = ZeroRecord()
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for j in range(n_micro):
            loss = step_loss(model, batches[step, j], case)
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
    from moe_dist.models.expert_parallel import apply_ep
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.engines.deepspeed import build_engine

    cfg = case.config()
    if case.ep not in meshes:  # one mesh per ep: DeepSpeed's registry keeps the first groups by name
        meshes[case.ep] = build_mesh(cfg.parallel, world_size, "cpu")
    mesh = meshes[case.ep]
    model = make_model(case)
    apply_ep(model, mesh)
    engine = build_engine(model, cfg, mesh, bf16=False, backend="gloo", local_rank=rank)
    batches = global_batches(case.model_case)
    local = mesh.local_experts(case.num_experts) if not case.dense else range(0, 0)
    record = ZeroRecord(expert_range=(local.start, local.stop))
    if case.stage in (1, 2):
        optimizer = engine.optimizer
        for group, is_moe in zip(optimizer.real_dp_process_group, optimizer.is_moe_param_group):
            (record.moe_partition_ranks if is_moe else record.dense_partition_ranks).append(_group_ranks(group))
    for step in range(STEPS):
        losses = []
        record.lrs.append(engine.optimizer.param_groups[0]["lr"])
        for m in range(case.accum):
            loss = step_loss(engine, batches[step, m * case.dp + mesh.dp_rank], case)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        record.losses.append(losses)
        record.norms.append(float(engine.get_global_grad_norm()))
    if case.stage != 3:  # ZeRO-3 keeps only partitions; the losses of later steps check its updates
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
        if case.stage == 3:
            continue
        assert set(rec.params) == set(ref.params), f"{case.name}: parameter names differ"
        for name, value in rec.params.items():
            want_param = torch.from_numpy(ref.params[name])
            if is_expert_name(name):
                want_param = want_param[start:stop]
            torch.testing.assert_close(torch.from_numpy(value), want_param, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{case.name} rank {rank} final {name}: {m}")
    return worst


# --------------------------------------------------------------------------------------------
# The group bridge (world 4)
# --------------------------------------------------------------------------------------------

def bridge_and_cases(rank: int, world_size: int, cases: list[ZeroCase]) -> tuple[dict, list[ZeroRecord]]:
    """Register the mesh's expert groups for ep=2 and ep=4 and read them back through DeepSpeed's
    accessors; refuse a second, different ep=2 group; then run the training cases on the same
    meshes (DeepSpeed's registry keeps one group per name per process)."""
    from deepspeed.utils import groups

    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.distributed.deepspeed_bridge import deepspeed_expert_ranks, init_deepspeed_comm, register_expert_groups

    skip_shm_build()
    init_deepspeed_comm("gloo", local_rank=rank)
    meshes, bridge = {}, {}
    for ep in (2, 4):
        mesh = meshes[ep] = build_mesh(ParallelConfig(dp=world_size, tp=1, ep=ep), world_size, "cpu")
        name = register_expert_groups(mesh)
        bridge[ep] = {"name": name, "mesh_ep": mesh.group_ranks("ep"), "mesh_edp": mesh.group_ranks("edp"),
                      "ep_rank": (groups._get_expert_parallel_rank(name), mesh.ep_rank),
                      "edp_rank": (groups._get_expert_data_parallel_rank(name), mesh.edp_rank),
                      **deepspeed_expert_ranks(name)}
    other = build_mesh(ParallelConfig(dp=world_size, tp=1, ep=2), world_size, "cpu")  # new group objects
    try:
        register_expert_groups(other)
        bridge["foreign"] = "accepted"
    except RuntimeError as exc:
        bridge["foreign"] = str(exc)
    return bridge, [run_zero_rank(rank, world_size, case, meshes) for case in cases]


def _check_cases(cases: list[ZeroCase], per_rank: list[list[ZeroRecord]], world_size: int) -> None:
    from moe_dist.distributed.mesh import MeshLayout

    for i, case in enumerate(cases):
        ranks = [records[i] for records in per_rank]
        # fp32 on both sides; differences come only from summation order (flat buckets,
        # reduce-scatter) and stay around 1e-7 relative (measured max |loss diff| ~5e-7).
        worst = check_zero_against_native(case, ranks, native_reference(case), world_size, rtol=1e-4, atol=1e-5)
        print(f"{case.name}: max |loss diff| vs native {worst:.1e}")
        if case.stage in (1, 2) and not case.dense:
            layout = MeshLayout(world_size=world_size, dp=case.dp, tp=1, ep=case.ep, etp=1)
            for rank, rec in enumerate(ranks):
                assert rec.moe_partition_ranks and all(g == layout.group_of("edp", rank)
                                                       for g in rec.moe_partition_ranks), (case.name, rank)
                assert all(g == list(range(world_size)) for g in rec.dense_partition_ranks), (case.name, rank)


WORLD2 = [
    ZeroCase("zero1_ep2", stage=1, dp=2, ep=2),
    ZeroCase("zero2_ep2_accum2", stage=2, dp=2, ep=2, accum=2),
    ZeroCase("zero3_dense", stage=3, dp=2, ep=1, dense=True),
]
WORLD4 = [
    ZeroCase("zero1_dp4xep2", stage=1, dp=4, ep=2),
    ZeroCase("zero2_dp4xep2", stage=2, dp=4, ep=2),
    ZeroCase("zero2_ep4", stage=2, dp=4, ep=4, num_experts=8),
]


def test_zero_matches_native_world2():
    """ZeRO-1 and ZeRO-2 with ep=2 (edp groups of one rank), accumulation, and ZeRO-3 on a dense
    model: losses, grad norms, learning rates and parameters equal the native engine's."""
    per_rank = run_distributed(run_zero_cases, 2, WORLD2, timeout=150)
    _check_cases(WORLD2, per_rank, 2)


def test_group_bridge_and_zero_world4():
    """DeepSpeed's ep/edp groups are the mesh's (ep=2: ep [0,1] [2,3], edp [0,2] [1,3]; ep=4: ep
    [0..3], edp singletons), ZeRO partitions expert state over them, and ZeRO-1/2 match native."""
    results = run_distributed(bridge_and_cases, 4, WORLD4, timeout=200)
    for rank, (bridge, _) in enumerate(results):
        for ep in (2, 4):
            b = bridge[ep]
            assert b["name"] == f"ep_size_{ep}"
            assert b["ep"] == b["ep_recorded"] == b["mesh_ep"], (rank, ep, b)
            assert b["edp"] == b["edp_recorded"] == b["mesh_edp"], (rank, ep, b)
            assert b["ep_rank"][0] == b["ep_rank"][1] and b["edp_rank"][0] == b["edp_rank"][1], (rank, ep, b)
        assert bridge[2]["mesh_ep"] == [[0, 1], [0, 1], [2, 3], [2, 3]][rank]
        assert bridge[2]["mesh_edp"] == [[0, 2], [1, 3], [0, 2], [1, 3]][rank]
        assert bridge[4]["mesh_ep"] == [0, 1, 2, 3] and bridge[4]["mesh_edp"] == [rank]
        assert "already holds ep_size_2" in bridge["foreign"], bridge["foreign"]
    _check_cases(WORLD4, [records for _, records in results], 4)


# --------------------------------------------------------------------------------------------
# Single-process checks: the generated config and the refusals
# --------------------------------------------------------------------------------------------

def test_generated_ds_config():
    from moe_dist.train.engines.deepspeed_config import build_ds_config

    case = ZeroCase("cfg", stage=2, dp=2, ep=2, accum=2)
    cfg = case.config()
    cfg.zero.offload_optimizer = True
    ds = build_ds_config(cfg, dp_size=2, bf16=True)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == MAX_NORM
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 500
    assert zero["contiguous_gradients"] and zero["reduce_scatter"]
    assert zero["offload_optimizer"]["device"] == "cpu" and ds["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # client AdamW + LambdaLR


def test_user_ds_config_merges_and_refuses_clashes(tmp_path):
    import pytest

    from moe_dist.config import ConfigError
    from moe_dist.train.engines.deepspeed_config import build_ds_config

    cfg = ZeroCase("cfg", stage=1, dp=2, ep=2).config()
    extra = tmp_path / "extra.json"
    extra.write_text('{"wall_clock_breakdown": true}')
    cfg.zero.ds_config = str(extra)
    assert build_ds_config(cfg, 2, bf16=False)["wall_clock_breakdown"] is True
    extra.write_text('{"train_batch_size": 64, "wall_clock_breakdown": true}')
    with pytest.raises(ConfigError, match=r"zero.ds_config sets \['train_batch_size'\].*train.global_batch_size"):
        build_ds_config(cfg, 2, bf16=False)


def test_unsupported_deepspeed_layouts_are_refused_up_front():
    """The refused cells of docs/deepspeed.md's feature table: ZeRO-3 with MoE, ZeRO-0 with ep > 1,
    one process, tp > 1 and etp > 1, each by ``validate`` before any process group exists."""
    import pytest

    from moe_dist.config import ConfigError, validate

    moe = ZeroCase("z3", stage=3, dp=4, ep=2).config()
    with pytest.raises(ConfigError, match=r"zero.stage \(3\) with an MoE model.*use zero.stage=2"):
        validate(moe, 4)
    stage0 = ZeroCase("z0", stage=0, dp=4, ep=2).config()
    with pytest.raises(ConfigError, match=r"zero.stage \(0\) with parallel.ep \(2\).*zero.stage=1"):
        validate(stage0, 4)
    single = ZeroCase("one", stage=2, dp=1, ep=1).config()
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        validate(single, 1)
    tp = ZeroCase("tp", stage=2, dp=2, ep=2).config()
    tp.parallel.tp = 2
    with pytest.raises(ConfigError, match=r"train.engine=deepspeed with parallel.tp \(2\) > 1.*train.engine=native"):
        validate(tp, 4)
    etp = ZeroCase("etp", stage=2, dp=4, ep=2).config()
    etp.parallel.etp = 2
    with pytest.raises(ConfigError, match=r"parallel.etp \(2\) > 1 is not supported"):  # refused for every engine
        validate(etp, 4)
    validate(ZeroCase("ok", stage=2, dp=4, ep=2).config(), 4)  # the supported layout passes
