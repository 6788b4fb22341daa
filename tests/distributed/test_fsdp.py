"""FSDP2 with expert parallelism (``parallel.fsdp``, moe_dist/models/fsdp.py) on gloo.

* Parity with the single-process model, 3 AdamW steps, every loss, clipped grad norm, gradient
  and final parameter compared (shards gathered with ``full_tensor``): 2 ranks FSDP alone
  (dp=2, experts sharded over edp=2); 4 ranks with ep=2 (dense dp=4, experts edp=2 x ep=2)
  and 2 accumulation micro-batches (the first under ``no_sync``); 4 ranks with ep=4 (edp=1).
* Mixed precision as on CUDA (``param_dtype`` bf16, on gloo here): the weights a block computes
  with are bf16, the sharded weights and the reduced gradients fp32, the loss within 2%.
* The layout really is sharded: dense weights hold 1/dp of the rows, expert weights their ep
  block cut along dim 1 over edp, both as DTensors on the dp and edp meshes.
* Checkpoints across layouts, in the same 4-rank run: FSDP at ep=2 trains 2 steps and saves;
  ep=2 without FSDP resumes from it and saves again; FSDP at ep=4 (edp=1) resumes from that;
  one process resumes from the FSDP checkpoint. Each takes step 3 and evaluates step 4; both
  losses must equal the original FSDP run's (rel 1e-5). The FSDP checkpoint holds the expert
  weights as 4 chunks (2 ep blocks x 2 edp halves of dim 1) of the global tensor.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from harness import run_distributed
from parity import Case, build_model, check_against_reference, micro_loss, run_cases, run_reference

from moe_dist.config import ParallelConfig, TrainConfig

FSDP_DP2 = Case("fsdp_dp2", dp=2, ep=1, fsdp=True)
# fused AdamW over DTensor shards on two meshes (dp and edp): train.optimizer_impl=fused with FSDP
FSDP_EP2 = Case("fsdp_dp4_ep2_accum2_fused", dp=4, ep=2, accum=2, fsdp=True, optimizer_impl="fused")
FSDP_EP4 = Case("fsdp_dp4_ep4", dp=4, ep=4, fsdp=True)  # edp=1: experts on a size-1 mesh

# checkpoint round trip
MICROS, LR, LR_AT_SAVE, SAVE_AFTER, REL = 4, 1e-2, 3e-3, 2, 1e-5


def _batches() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (SAVE_AFTER + 2, MICROS, 2, 9), generator=gen)


def _setup(mesh, parallel: ParallelConfig | None):
    from moe_dist.train.optim import build_optimizer
    from moe_dist.train.plan import LocalPlan, parallelize

    model = build_model(Case("ckpt", dp=1, ep=1))
    plan = LocalPlan().attach(model) if parallel is None else parallelize(model, mesh, parallel)
    return model, plan, build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.1))


def _train_step(model, plan, optimizer, mesh, step: int) -> float:
    accum = MICROS // mesh.dp_size
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for m in range(accum):
        with (plan.no_sync() if m < accum - 1 else contextlib.nullcontext()):
            loss = micro_loss(model, _batches()[step, m * mesh.dp_size + mesh.dp_rank])
            (loss / accum).backward()
        total += loss.detach() / accum
    plan.finish_gradient_sync()
    plan.clip_grad_norm_(1.0)
    optimizer.step()
    return float(plan.mean_over_dp(total))


@torch.no_grad()
def _eval_loss(model, plan, mesh, step: int) -> float:
    accum = MICROS // mesh.dp_size
    total = sum(micro_loss(model, _batches()[step, m * mesh.dp_size + mesh.dp_rank]) for m in range(accum))
    return float(plan.mean_over_dp(total / accum))


def _next_two(model, plan, optimizer, mesh) -> tuple[float, float]:
    return _train_step(model, plan, optimizer, mesh, SAVE_AFTER), _eval_loss(model, plan, mesh, SAVE_AFTER + 1)


def _layout(rank: int, world_size: int) -> dict:
    """Local shapes and meshes of a freshly sharded model (dp=4, ep=2)."""
    from torch.distributed.tensor import DTensor

    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.plan import parallelize

    parallel = ParallelConfig(ep=2, fsdp=True)
    mesh = build_mesh(parallel, world_size, "cpu")
    model = build_model(Case("layout", dp=4, ep=2))
    parallelize(model, mesh, parallel)
    out = {}
    for name in ("layers.0.attention.wq.weight", "layers.0.mlp.experts.w13"):
        param = dict(model.named_parameters())[name]
        assert isinstance(param, DTensor), f"{name} is {type(param).__name__}"
        out[name] = (tuple(param.to_local().shape), tuple(param.shape), str(param.placements),
                     param.device_mesh.mesh.tolist())
    return out


def _mixed_precision(rank: int, world_size: int) -> dict:
    """One forward/backward with bf16 parameters (what a CUDA run uses) next to fp32."""
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.plan import parallelize

    parallel = ParallelConfig(fsdp=True)
    mesh = build_mesh(parallel, world_size, "cpu")
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    reference = micro_loss(build_model(FSDP_DP2), tokens).item()
    model = build_model(FSDP_DP2)
    parallelize(model, mesh, parallel, param_dtype=torch.bfloat16)
    seen = {}

    def record(name: str):
        def hook(module, _args) -> None:
            seen[name] = str(next(module.parameters(recurse=False)).dtype)
        return hook

    for name in ("attention.wq", "mlp.experts"):
        model.layers[0].get_submodule(name).register_forward_pre_hook(record(name))
    loss = micro_loss(model, tokens)
    loss.backward()
    return {"loss": loss.item(), "reference": reference, "compute": seen,
            "params": sorted({str(p.dtype) for p in model.parameters()}),
            "grads": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})}


def _world2(rank: int, world_size: int) -> dict:
    return {"parity": run_cases(rank, world_size, [FSDP_DP2]), "mixed": _mixed_precision(rank, world_size)}


def _world4(rank: int, world_size: int, root: str) -> dict:
    from moe_dist.distributed import checkpoint as dist_ckpt
    from moe_dist.distributed.mesh import build_mesh

    parity = run_cases(rank, world_size, WORLD4_CASES)
    layout = _layout(rank, world_size)

    fsdp_ep2 = ParallelConfig(ep=2, fsdp=True)
    mesh = build_mesh(fsdp_ep2, world_size, "cpu")
    model, plan, optimizer = _setup(mesh, fsdp_ep2)
    for step in range(SAVE_AFTER):
        _train_step(model, plan, optimizer, mesh, step)
    for group in optimizer.param_groups:
        group["lr"] = LR_AT_SAVE  # the resumed runs must restore it
    saved = Path(root) / "fsdp_ep2"
    plan.save_model_and_optimizer(saved, model, optimizer)
    metadata = dist_ckpt.read_metadata(saved)
    w13 = "layers.0.mlp.experts.w13"
    chunks = {key: sorted(tuple(c.offsets) for c in metadata.state_dict_metadata[key].chunks)
              for key in (f"model.{w13}", f"optim.state.{w13}.exp_avg")}
    original = _next_two(model, plan, optimizer, mesh)

    resumed = {}
    plain_ep2 = ParallelConfig(ep=2)
    mesh = build_mesh(plain_ep2, world_size, "cpu")
    model, plan, optimizer = _setup(mesh, plain_ep2)
    plan.load_model_and_optimizer(saved, model, optimizer)
    plan.save_model_and_optimizer(Path(root) / "plain_ep2", model, optimizer)  # re-saved without FSDP
    resumed["ep2 <- fsdp_ep2"] = _next_two(model, plan, optimizer, mesh)
    plan.reducer.remove_hooks()

    fsdp_ep4 = ParallelConfig(ep=4, fsdp=True)
    mesh = build_mesh(fsdp_ep4, world_size, "cpu")
    model, plan, optimizer = _setup(mesh, fsdp_ep4)
    plan.load_model_and_optimizer(Path(root) / "plain_ep2", model, optimizer)
    resumed["fsdp_ep4 <- ep2"] = _next_two(model, plan, optimizer, mesh)
    return {"parity": parity, "layout": layout, "chunks": chunks, "original": original, "resumed": resumed}


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return root, run_distributed(_world4, 4, str(root), timeout=240)


def test_fsdp_dp2_matches_single_process_and_bf16_params_reduce_in_fp32():
    results = run_distributed(_world2, 2, timeout=120)
    check_against_reference(FSDP_DP2, [r["parity"][0] for r in results], run_reference(FSDP_DP2), 2)
    for rank, result in enumerate(results):
        mixed = result["mixed"]
        # all-gathered (compute) weights in bf16, sharded weights and reduced grads in fp32
        assert mixed["compute"] == {"attention.wq": "torch.bfloat16", "mlp.experts": "torch.bfloat16"}, mixed
        assert mixed["params"] == ["torch.float32"] and mixed["grads"] == ["torch.float32"], mixed
        assert mixed["loss"] == pytest.approx(mixed["reference"], rel=2e-2), f"rank {rank}: {mixed}"


WORLD4_CASES = [FSDP_EP2, FSDP_EP4]


@pytest.mark.parametrize("case", WORLD4_CASES, ids=lambda case: case.name)
def test_fsdp_with_ep_matches_single_process(world4, case):
    _, results = world4
    index = WORLD4_CASES.index(case)
    check_against_reference(case, [r["parity"][index] for r in results], run_reference(case), 4)


def test_dense_weights_shard_over_dp_and_experts_over_edp(world4):
    _, results = world4
    for rank, result in enumerate(results):
        wq_local, wq_global, wq_placement, wq_mesh = result["layout"]["layers.0.attention.wq.weight"]
        assert wq_global == (32, 32) and wq_local == (8, 32), f"rank {rank}: wq {wq_local} of {wq_global}"
        assert wq_placement == "(Shard(dim=0),)" and wq_mesh == [0, 1, 2, 3], (rank, wq_placement, wq_mesh)
        w13_local, w13_global, w13_placement, w13_mesh = result["layout"]["layers.0.mlp.experts.w13"]
        # 4 experts over ep=2: this rank's 2; dim 1 (model dim 32) halved over its edp group
        assert w13_global[:2] == (2, 32) and w13_local[:2] == (2, 16), \
            f"rank {rank}: w13 {w13_local} of {w13_global}"
        assert w13_placement == "(Shard(dim=1),)", (rank, w13_placement)
        assert w13_mesh == [rank % 2, rank % 2 + 2], f"rank {rank}: experts sharded over {w13_mesh}, not its edp group"


def test_checkpoints_resume_with_and_without_fsdp(world4):
    from moe_dist.distributed.mesh import ParallelMesh

    root, results = world4
    original = results[0]["original"]
    resumed = {name: [r["resumed"][name] for r in results] for name in results[0]["resumed"]}
    model, plan, optimizer = _setup(ParallelMesh.single(), None)
    plan.load_model_and_optimizer(root / "fsdp_ep2", model, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [LR_AT_SAVE] * len(optimizer.param_groups)
    resumed["single <- fsdp_ep2"] = [_next_two(model, plan, optimizer, ParallelMesh.single())]
    for name, per_rank in resumed.items():
        for rank, (loss3, loss4) in enumerate(per_rank):
            assert loss3 == pytest.approx(original[0], rel=REL), f"{name} rank {rank}: step-3 loss"
            assert loss4 == pytest.approx(original[1], rel=REL), f"{name} rank {rank}: step-4 loss"
    # Global tensors on disk: 2 ep blocks of dim 0, each cut in 2 along dim 1 over edp.
    for key, offsets in results[0]["chunks"].items():
        assert offsets == [(0, 0, 0), (0, 16, 0), (2, 0, 0), (2, 16, 0)], f"{key}: chunks at {offsets}"
