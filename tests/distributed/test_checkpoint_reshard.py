"""Layout-independent checkpoints (moe_dist/distributed/checkpoint.py) on gloo.

A tiny MoE Transformer trains 2 AdamW steps at (dp=4, ep=4) and saves. The checkpoint is then
resumed at (dp=2, tp=2, ep=2), at (dp=2, ep=2) -- which saves again -- then at (dp=2, ep=1) --
which saves again -- and finally in one process, from both the first and the last checkpoint.
Every resumed run takes step 3 and evaluates step 4's loss; both must equal the original run's
(rel 1e-5): step 3's loss checks the weights, step 4's the AdamW state and the learning rate
(which the original run changed just before saving, so only a restored param group has it).

The exactly-once check is tested on a real defective checkpoint (one rank leaves its expert
shard out) and on hand-written DCP metadata (overlap, gap); a checkpoint of another model shape
fails with the tensor's name and both shapes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from harness import run_distributed
from parity import Case, build_model

from moe_dist.config import ParallelConfig, TrainConfig

NUM_EXPERTS = 4
MICROS = 4  # micro-batches per global batch (dp * accumulation)
MICRO_BATCH, SEQ_LEN = 2, 8
LR, LR_AT_SAVE = 1e-2, 3e-3
SAVE_AFTER = 2  # optimizer steps before the first checkpoint
REL = 1e-5


def _batches() -> torch.Tensor:
    """[steps, micro-batches, rows, seq+1] token ids; dp rank r's micro m is global micro m*dp + r."""
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (SAVE_AFTER + 2, MICROS, MICRO_BATCH, SEQ_LEN + 1), generator=gen)


def _micro_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    return lm + sum(out.losses.values())


def _setup(mesh, parallel: ParallelConfig | None):
    """Model, plan and optimizer for a layout (parallel None: one process)."""
    from moe_dist.train.optim import build_optimizer
    from moe_dist.train.plan import LocalPlan

    model = build_model(Case("ckpt", dp=1, ep=1, num_experts=NUM_EXPERTS))
    if parallel is None:
        plan = LocalPlan().attach(model)
    else:
        from moe_dist.train.plan import parallelize

        plan = parallelize(model, mesh, parallel)
    optimizer = build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.1))
    return model, plan, optimizer


def _train_step(model, plan, optimizer, mesh, step: int) -> float:
    """One optimizer step on global batch ``step``; returns the global mean loss."""
    batches = _batches()
    accum = MICROS // mesh.dp_size
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for m in range(accum):
        last = m == accum - 1
        with (plan.no_sync() if not last else contextlib.nullcontext()):
            loss = _micro_loss(model, batches[step, m * mesh.dp_size + mesh.dp_rank])
            (loss / accum).backward()
        total += loss.detach() / accum
    plan.finish_gradient_sync()
    plan.clip_grad_norm_(1.0)
    optimizer.step()
    return float(plan.mean_over_dp(total))


@torch.no_grad()
def _eval_loss(model, plan, mesh, step: int) -> float:
    batches = _batches()
    accum = MICROS // mesh.dp_size
    total = sum(_micro_loss(model, batches[step, m * mesh.dp_size + mesh.dp_rank]) for m in range(accum))
    return float(plan.mean_over_dp(total / accum))


def _resume(mesh, parallel, directory) -> tuple[float, float]:
    """Load ``directory`` at this layout, take step SAVE_AFTER and evaluate the next step."""
    model, plan, optimizer = _setup(mesh, parallel)
    plan.load_model_and_optimizer(directory, model, optimizer)
    loss = _train_step(model, plan, optimizer, mesh, SAVE_AFTER)
    return loss, _eval_loss(model, plan, mesh, SAVE_AFTER + 1)


def _world4(rank: int, world_size: int, root: str) -> dict:
    from pathlib import Path

    from moe_dist.distributed import checkpoint as dist_ckpt
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.checkpoint import CheckpointError

    parallel = ParallelConfig(dp=4, ep=4)
    mesh = build_mesh(parallel, world_size, "cpu")
    model, plan, optimizer = _setup(mesh, parallel)
    for step in range(SAVE_AFTER):
        _train_step(model, plan, optimizer, mesh, step)
    for group in optimizer.param_groups:
        group["lr"] = LR_AT_SAVE  # as a schedule would; the resumed runs must restore it
    saved = Path(root) / "dp4_ep4"
    plan.save_model_and_optimizer(saved, model, optimizer)
    metadata = dist_ckpt.read_metadata(saved)
    w13 = next(name for name, _ in model.named_parameters() if name.endswith("experts.w13"))
    chunks = {key: sorted(tuple(c.offsets)[0] for c in metadata.state_dict_metadata[key].chunks)
              for key in (f"model.{w13}", f"optim.state.{w13}.exp_avg", f"optim.state.{w13}.exp_avg_sq")}
    original = (_train_step(model, plan, optimizer, mesh, SAVE_AFTER), _eval_loss(model, plan, mesh, SAVE_AFTER + 1))

    # Defective saves, which every rank must reject naming the tensor: rank 1 leaves its expert
    # shard out (a gap DCP's planner sees); no rank offers an expert's Adam slot (only the
    # comparison with the expected tensors sees that).
    errors = {}
    for case in ("missing_shard", "missing_slot"):
        broken = dist_ckpt.build_state(model, optimizer, mesh)
        if case == "missing_shard" and rank == 1:
            del broken.state["model"][w13]
        if case == "missing_slot":
            del broken.state["optim"]["state"][w13]["exp_avg"]
        try:
            dist_ckpt.save_state(broken, Path(root) / case)
            errors[case] = "no error"
        except CheckpointError as exc:
            errors[case] = str(exc)

    tp_parallel = ParallelConfig(dp=2, tp=2, ep=2)
    tp_resumed = _resume(build_mesh(tp_parallel, world_size, "cpu"), tp_parallel, saved)
    numel = metadata.state_dict_metadata[f"model.{w13}"].size.numel()
    return {"original": original, "chunks": chunks, "w13": w13, "numel": numel, "errors": errors,
            "tp2_ep2": tp_resumed}


def _world2(rank: int, world_size: int, root: str) -> dict:
    from pathlib import Path

    from moe_dist.distributed.mesh import build_mesh

    out = {}
    source = Path(root) / "dp4_ep4"
    for name, parallel in (("dp2_ep2", ParallelConfig(dp=2, ep=2)), ("dp2_ep1", ParallelConfig(dp=2, ep=1))):
        mesh = build_mesh(parallel, world_size, "cpu")
        model, plan, optimizer = _setup(mesh, parallel)
        plan.load_model_and_optimizer(source, model, optimizer)
        target = Path(root) / name
        plan.save_model_and_optimizer(target, model, optimizer)  # re-saved at this layout
        out[name] = (_train_step(model, plan, optimizer, mesh, SAVE_AFTER),
                     _eval_loss(model, plan, mesh, SAVE_AFTER + 1))
        source = target
    return out


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    world4 = run_distributed(_world4, 4, str(root), timeout=180)
    world2 = run_distributed(_world2, 2, str(root), timeout=120)
    return root, world4, world2


def _single_process(directory) -> tuple[float, float]:
    from moe_dist.distributed.mesh import ParallelMesh

    return _resume(ParallelMesh.single(), None, directory)


def test_next_step_loss_is_the_same_at_every_layout(resharded):
    root, world4, world2 = resharded
    original = world4[0]["original"]
    results = {"dp4_ep4 (no reload)": [r["original"] for r in world4],
               "dp2_tp2_ep2 <- dp4_ep4": [r["tp2_ep2"] for r in world4],
               "dp2_ep2 <- dp4_ep4": [r["dp2_ep2"] for r in world2],
               "dp2_ep1 <- dp2_ep2": [r["dp2_ep1"] for r in world2],
               "single <- dp2_ep1": [_single_process(root / "dp2_ep1")],
               "single <- dp4_ep4": [_single_process(root / "dp4_ep4")]}
    for name, per_rank in results.items():
        for rank, (loss3, loss4) in enumerate(per_rank):
            assert loss3 == pytest.approx(original[0], rel=REL), f"{name} rank {rank}: step-3 loss"
            assert loss4 == pytest.approx(original[1], rel=REL), f"{name} rank {rank}: step-4 loss"
    # The learning rate was changed just before the save: without it the update would differ.
    model, plan, optimizer = _setup(None, None)
    plan.load_model_and_optimizer(root / "dp2_ep1", model, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [LR_AT_SAVE] * len(optimizer.param_groups)


def test_expert_weights_and_adam_state_are_written_as_ep_shards(resharded):
    _, world4, _ = resharded
    for key, offsets in world4[0]["chunks"].items():
        assert offsets == [0, 1, 2, 3], f"{key}: one chunk per ep rank expected, got offsets {offsets}"


def test_missing_shard_or_slot_fails_the_exactly_once_check_on_every_rank(resharded):
    _, world4, _ = resharded
    w13, numel = world4[0]["w13"], world4[0]["numel"]
    for rank, result in enumerate(world4):
        shard, slot = result["errors"]["missing_shard"], result["errors"]["missing_slot"]
        # rank 1's expert (one of four) is the gap
        assert "exactly-once check" in shard and f"key:model.{w13} invalid fill" in shard, f"rank {rank}: {shard}"
        assert f"chunks-volume: {numel * 3 // 4}" in shard, shard
        assert "exactly-once check" in slot, f"rank {rank}: {slot}"
        assert f"tensor optim.state.{w13}.exp_avg (shape (4, " in slot and "was not written" in slot, slot


def test_checkpoint_of_another_shape_names_the_tensor(resharded):
    from moe_dist.train.checkpoint import CheckpointError
    from moe_dist.train.optim import build_optimizer
    from moe_dist.train.plan import LocalPlan

    root, _, _ = resharded
    model = build_model(Case("bigger", dp=1, ep=1, num_experts=2 * NUM_EXPERTS))
    optimizer = build_optimizer(model, TrainConfig(lr=LR))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.\d+\.\S+experts\.w13: checkpoint shape "
                                              r"\(4, 32, \d+\) != model shape \(8, 32, \d+\)"):
        LocalPlan().attach(model).load_model_and_optimizer(root / "dp4_ep4", model, optimizer)


def test_coverage_check_on_hand_written_metadata():
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    from moe_dist.distributed.checkpoint import verify_coverage
    from moe_dist.train.checkpoint import CheckpointError

    def metadata(chunks: list[tuple[tuple[int, int], tuple[int, int]]]) -> Metadata:
        entry = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([4, 3]),
                                      [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
        storage = {MetadataIndex("w", torch.Size(o)): object() for o, _ in chunks}
        return Metadata(state_dict_metadata={"w": entry}, storage_data=storage)

    verify_coverage(metadata([((0, 0), (2, 3)), ((2, 0), (2, 3))]), {"w": (4, 3)}, "ok")
    with pytest.raises(CheckpointError, match=r"chunks at offsets \(0, 0\) and \(1, 0\) overlap"):
        verify_coverage(metadata([((0, 0), (2, 3)), ((1, 0), (2, 3)), ((3, 0), (1, 3))]), {"w": (4, 3)}, "x")
    with pytest.raises(CheckpointError, match=r"chunks cover 6 of 12 elements"):
        verify_coverage(metadata([((0, 0), (2, 3))]), {"w": (4, 3)}, "x")
    with pytest.raises(CheckpointError, match=r"lies outside"):
        verify_coverage(metadata([((0, 0), (2, 3)), ((2, 0), (3, 3))]), {"w": (4, 3)}, "x")
    with pytest.raises(CheckpointError, match=r"tensor v \(shape \(2,\)\) was not written"):
        verify_coverage(metadata([((0, 0), (4, 3))]), {"w": (4, 3), "v": (2,)}, "x")
