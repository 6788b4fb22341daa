"""Expert tensor parallelism (parallel.etp) on gloo against the single-process model.

One process start per world size, several checks in each:

* world 2, ``etp=2`` (ep=1: the local dispatcher, then the etp all-gather / reduce-scatter):
  dropless, fixed capacity, and 2 accumulation micro-batches with the aux-free bias moving; plus
  the uneven row collectives of ``comms`` (zero rows on one rank, autograd both ways);
* world 4, ``ep=2 x etp=2`` (edp 1) dropless and fixed capacity, routing forced onto experts 0
  and 1 (the ep ranks of experts 2-3 get no rows), ``etp=2`` with edp 2 (expert grads summed
  over edp, divided by dp), and ``dp=2 x tp=2`` beside ``ep=2 x etp=2`` (parallel folding: the
  etp groups are the tp groups);
* every parity case: 3 AdamW steps, each micro-batch loss, the clipped global grad norm (etp
  shards' squared norms summed over etp), every gradient (each rank's shard against the same
  slice of the reference, so the shards of all ranks cover the full gradient) and the final
  parameters (``parity.check_against_reference``); host syncs: one per MoE layer forward for the
  etp gather plus one for the ep all-to-all when dropless, none with fixed capacity;
* checkpoints across layouts (world 4): one process trains a step and saves; ``ep=2 x etp=2``
  loads it, takes the next step and saves; ``ep=1 x etp=4`` and ``ep=4 x etp=1`` load that; one
  process loads it too. Every loaded shard (weights and Adam moments) equals the slice of the
  saved global tensor, the ``etp=2`` step equals the single-process step, and ``w13`` is written
  in 8 chunks (2 ep blocks x 2 etp blocks x gate/up), each once (``verify_coverage``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness import run_distributed
from parity import Case, build_model, check_against_reference, micro_loss, run_cases, run_reference

from moe_dist.config import ParallelConfig, TrainConfig

WORLD2 = [
    Case("etp2_dropless", dp=2, ep=1, etp=2),
    Case("etp2_capacity", dp=2, ep=1, etp=2, capacity=True),
    Case("etp2_accum2_bias", dp=2, ep=1, etp=2, accum=2, bias_rate=1e-2),
]
WORLD4 = [
    Case("ep2xetp2_dropless", dp=4, ep=2, etp=2),
    Case("ep2xetp2_capacity", dp=4, ep=2, etp=2, capacity=True),
    Case("ep2xetp2_zero_tokens", dp=4, ep=2, etp=2, force_experts=(0, 1)),
    Case("dp4xetp2_edp2_dropless", dp=4, ep=1, etp=2),
    Case("dp2xtp2xep2xetp2_dropless", dp=2, tp=2, ep=2, etp=2),
]


def _check_parity(cases: list[Case], world_size: int, results) -> None:
    for i, case in enumerate(cases):
        ranks = [per_rank[i] for per_rank in results]
        check_against_reference(case, ranks, run_reference(case), world_size)
        per_forward = 0 if case.capacity else (2 if case.ep > 1 else 1)
        syncs = [r.host_syncs for r in ranks]
        # 2 MoE layers, 3 steps, accum micro-batches per step
        assert syncs == [per_forward * 2 * 3 * case.accum] * world_size, f"{case.name}: host syncs {syncs}"


# --------------------------------------------------------------------------------------------
# world 2
# --------------------------------------------------------------------------------------------

def _uneven_rows(rank: int, world_size: int) -> dict:
    """all_gather_rows / reduce_scatter_rows with rows [3, 0] and equal rows, forward and backward."""
    from moe_dist.distributed import comms
    from moe_dist.distributed.mesh import build_mesh

    group = build_mesh(ParallelConfig(dp=2, ep=1, etp=2), world_size, "cpu").etp_group
    out = {}
    for rows in ([3, 0], None):
        mine = (rows or [2, 2])[rank]
        x = (torch.arange(mine * 2, dtype=torch.float32).view(mine, 2) + 10 * rank).requires_grad_()
        gathered = comms.all_gather_rows(x, rows, group)
        weight = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered) * (rank + 1)
        (gathered * weight).sum().backward()
        y = (torch.ones(gathered.shape[0], 2) * (rank + 1)).requires_grad_()
        scattered = comms.reduce_scatter_rows(y, rows, group)
        (scattered * 5).sum().backward()
        out[str(rows)] = (gathered.detach().numpy(), x.grad.numpy(), scattered.detach().numpy(), y.grad.numpy())
    return out


def _world2(rank: int, world_size: int) -> tuple:
    return run_cases(rank, world_size, WORLD2), _uneven_rows(rank, world_size)


def test_etp_world2():
    results = run_distributed(_world2, 2, timeout=180)
    _check_parity(WORLD2, 2, [parity for parity, _ in results])

    for rows, sizes in (("[3, 0]", [3, 0]), ("None", [2, 2])):
        xs = [torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 10 * r for r, n in enumerate(sizes)]
        full = torch.cat(xs)
        # d/dx of sum_r sum(gathered * weight_r): weight summed over both ranks (= 3x rank 0's)
        grad_full = torch.arange(full.numel(), dtype=torch.float32).view_as(full) * 3
        for rank, (_, per_rank) in enumerate(results):
            gathered, x_grad, scattered, y_grad = (torch.from_numpy(a) for a in per_rank[rows])
            torch.testing.assert_close(gathered, full)
            start = sum(sizes[:rank])
            torch.testing.assert_close(x_grad, grad_full[start:start + sizes[rank]])
            torch.testing.assert_close(scattered, torch.full((sizes[rank], 2), 3.0))  # 1 + 2
            torch.testing.assert_close(y_grad, torch.full((sum(sizes), 2), 5.0))


# --------------------------------------------------------------------------------------------
# world 4: parity, then checkpoints across layouts
# --------------------------------------------------------------------------------------------

CKPT_CASE = Case("ckpt", dp=1, ep=1)
LR = 1e-2


def _ckpt_tokens() -> torch.Tensor:
    """[steps 2, micro-batches 4, rows 2, seq+1]; dp rank r of 4 takes micro-batch r."""
    return torch.randint(0, 64, (2, 4, 2, 9), generator=torch.Generator().manual_seed(5))


def _optimizer(model):
    from moe_dist.train.optim import build_optimizer

    return build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.1))


def _step(model, plan, optimizer, micro_batches: list[torch.Tensor], accum_over: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    for tokens in micro_batches:
        (micro_loss(model, tokens) / accum_over).backward()
    plan.finish_gradient_sync()
    plan.clip_grad_norm_(1.0)
    optimizer.step()


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and its Adam moments, as this rank holds them (numpy, for the queue)."""
    out = {}
    for name, param in model.named_parameters():
        out[name] = param.detach().clone().numpy()
        for slot in ("exp_avg", "exp_avg_sq"):
            out[f"{name}:{slot}"] = optimizer.state[param][slot].clone().numpy()
    return out


def _layout_of(model, mesh) -> dict:
    experts = next(layer.experts for _, layer in model.moe_layers())
    return {"experts": (experts.expert_offset, experts.expert_offset + experts.num_experts),
            "etp_rank": mesh.etp_rank, "etp": mesh.etp_size}


def _checkpoints(rank: int, world_size: int, root: str) -> dict:
    from moe_dist.distributed import checkpoint as dist_ckpt
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.plan import parallelize

    out = {}
    tokens = _ckpt_tokens()
    for name, parallel, source in (("ep2_etp2", ParallelConfig(dp=4, ep=2, etp=2), "single"),
                                   ("ep1_etp4", ParallelConfig(dp=4, ep=1, etp=4), "ep2_etp2"),
                                   ("ep4_etp1", ParallelConfig(dp=4, ep=4, etp=1), "ep2_etp2")):
        mesh = build_mesh(parallel, world_size, "cpu")
        model = build_model(CKPT_CASE)
        plan = parallelize(model, mesh, parallel)
        optimizer = _optimizer(model)
        plan.load_model_and_optimizer(Path(root) / source, model, optimizer)
        entry = {"loaded": _state(model, optimizer), **_layout_of(model, mesh)}
        if name == "ep2_etp2":
            _step(model, plan, optimizer, [tokens[1, mesh.dp_rank]], 1)
            entry["stepped"] = _state(model, optimizer)
            plan.save_model_and_optimizer(Path(root) / name, model, optimizer)
            metadata = dist_ckpt.read_metadata(Path(root) / name)
            entry["chunks"] = {key: sorted(tuple(c.offsets) for c in md.chunks)
                               for key, md in metadata.state_dict_metadata.items() if key.endswith("experts.w13")}
        if hasattr(plan, "reducer"):
            plan.reducer.remove_hooks()
        out[name] = entry
    return out


def _world4(rank: int, world_size: int, root: str) -> tuple:
    return run_cases(rank, world_size, WORLD4), _checkpoints(rank, world_size, root)


def _single(steps: int, save: Path | None = None, load: Path | None = None):
    """One process: optionally load, take ``steps`` steps on the global batches, optionally save."""
    from moe_dist.train.plan import LocalPlan

    model = build_model(CKPT_CASE)
    plan = LocalPlan().attach(model)
    optimizer = _optimizer(model)
    if load is not None:
        plan.load_model_and_optimizer(load, model, optimizer)
    tokens = _ckpt_tokens()
    for step in range(steps):
        _step(model, plan, optimizer, list(tokens[step]), 4)
    if save is not None:
        plan.save_model_and_optimizer(save, model, optimizer)
    return model, optimizer


def _slice(full: torch.Tensor, key: str, layout: dict) -> torch.Tensor:
    from moe_dist.distributed.param_tags import take_etp_shard

    if ".experts." not in key:
        return full
    start, stop = layout["experts"]
    piece = full[start:stop]
    if layout["etp"] > 1:
        dim, parts = (2, 2) if key.split(":")[0].endswith("w13") else (1, 1)
        piece = take_etp_shard(piece, dim, parts, layout["etp_rank"], layout["etp"])
    return piece


def _compare(ranks_state: list[dict], layouts: list[dict], full: dict[str, torch.Tensor], what: str,
             **tolerance) -> None:
    for rank, (state, layout) in enumerate(zip(ranks_state, layouts)):
        assert set(state) == set(full), f"{what}: keys differ"
        for key, value in state.items():
            torch.testing.assert_close(torch.from_numpy(value), _slice(full[key], key, layout), **tolerance,
                                       msg=lambda m: f"{what} rank {rank} {key}: {m}")


def test_etp_world4(tmp_path):
    model, optimizer = _single(1, save=tmp_path / "single")
    saved = {k: torch.from_numpy(v) for k, v in _state(model, optimizer).items()}
    results = run_distributed(_world4, 4, str(tmp_path), timeout=300)
    _check_parity(WORLD4, 4, [parity for parity, _ in results])

    ckpt = [per_rank for _, per_rank in results]
    # 1. The single-process checkpoint loads at ep=2 x etp=2: every shard is its slice, exactly.
    layouts = [r["ep2_etp2"] for r in ckpt]
    _compare([r["loaded"] for r in layouts], layouts, saved, "single -> ep2 x etp2", rtol=0, atol=0)
    # 2. Its step equals the single process's step from the same state.
    model, optimizer = _single(2, load=None)
    stepped = {k: torch.from_numpy(v) for k, v in _state(model, optimizer).items()}
    _compare([r["stepped"] for r in layouts], layouts, stepped, "ep2 x etp2 step", rtol=1e-4, atol=1e-6)
    # 3. The ep=2 x etp=2 checkpoint: 8 w13 chunks per layer, and every other layout (one
    #    process, ep=1 x etp=4, ep=4 x etp=1) loads what the etp ranks held, exactly.
    for key, chunks in layouts[0]["chunks"].items():
        assert len(chunks) == 8, f"{key}: chunks {chunks}"
    model, optimizer = _single(0, load=tmp_path / "ep2_etp2")
    reloaded = {k: torch.from_numpy(v) for k, v in _state(model, optimizer).items()}
    _compare([r["stepped"] for r in layouts], layouts, reloaded, "ep2 x etp2 -> single", rtol=0, atol=0)
    for name in ("ep1_etp4", "ep4_etp1"):
        other = [r[name] for r in ckpt]
        _compare([r["loaded"] for r in other], other, reloaded, f"ep2 x etp2 -> {name}", rtol=0, atol=0)
