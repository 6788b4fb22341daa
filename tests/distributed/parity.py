"""Shared machinery of the DP/EP parity tests: a tiny MoE Transformer trained for a few AdamW
steps on gloo ranks and, in the pytest process, on one process with the same global batch.

Batch layout: a step has ``dp * accum`` micro-batches; data-parallel rank r's micro-batch m is
the reference's micro-batch ``m * dp + r``. Each rank divides its micro losses by ``accum``, the
reference by ``dp * accum``, so both optimise the mean over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_dist.config import CapacityConfig, ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moe_dist.models.transformer import Transformer

SEQ_LEN = 8
MICRO_BATCH = 2
STEPS = 3
MAX_NORM = 0.05  # small enough that every step clips, so the norm itself is tested
LR = 1e-2


@dataclass(frozen=True)
class Case:
    name: str
    dp: int
    ep: int
    tp: int = 1
    num_experts: int = 4
    capacity: bool = False
    accum: int = 1
    force_experts: tuple[int, ...] = ()
    """Route every token to these experts (selection bias), leaving other ranks with none."""
    bias_rate: float = 0.0
    """moe.router.bias_update_rate: the auxiliary-loss-free bias moves after every step (both
    sides call the plan's ``after_optimizer_step``, as the trainers do)."""
    fsdp: bool = False
    """Shard with FSDP2; gradients and parameters are gathered (full_tensor) before comparing."""
    etp: int = 1
    """Expert tensor parallelism: each expert's FFN split over etp ranks (MoE view edp x ep x etp)."""
    router: str = "softmax_topk"
    """moe.router.type (top_k 2 is the cap of the variable-k routers)."""
    dispatch_chunks: int = 1
    """moe.dispatch_chunks: the all-to-all in overlapped chunks (the reference, one process, has none)."""
    shared_experts: int = 0
    """moe.num_shared_experts."""
    optimizer_impl: str = "for_loop"
    """train.optimizer_impl of both sides (the elementwise implementations must agree across layouts)."""
    optimizer_state_dtype: str = "fp32"
    """train.optimizer_state_dtype of both sides ('bf16': the bf16-moment AdamW)."""


@dataclass
class RunRecord:
    losses: list[list[float]] = field(default_factory=list)  # [step][micro]
    norms: list[float] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # after clipping
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # after the last step
    expert_range: tuple[int, int] = (0, 0)
    tp_shards: dict[str, int] = field(default_factory=dict)  # param name -> sharded dim (tp > 1)
    tp_rank: int = 0
    etp_rank: int = 0
    host_syncs: int = 0
    kept: torch.Tensor | None = None  # [moe layers, E] assignments computed, by global expert id
    bias: torch.Tensor | None = None  # [moe layers, E] selection biases after the last step
    bias_of_every_rank: torch.Tensor | None = None  # [world, moe layers, E] all-gathered (rank 0..W-1)


def build_model(case: Case) -> Transformer:
    torch.manual_seed(1234)
    router = RouterConfig(type=case.router, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001,
                          bias_update_rate=case.bias_rate or (1e-6 if case.force_experts else 0.0))
    capacity = CapacityConfig(policy="fixed", capacity_factor=1.0) if case.capacity else CapacityConfig()
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=SEQ_LEN),
                        MoEConfig(num_experts=case.num_experts, router=router, capacity=capacity,
                                  dispatch_chunks=case.dispatch_chunks, num_shared_experts=case.shared_experts))
    if case.force_experts:
        for _, layer in model.moe_layers():
            for rank_of_choice, expert in enumerate(case.force_experts):
                layer.router.expert_bias[expert] = 10.0 - rank_of_choice
    return model


def global_batches(case: Case) -> torch.Tensor:
    """[steps, dp * accum, micro, seq+1] token ids."""
    gen = torch.Generator().manual_seed(99)
    return torch.randint(0, 64, (STEPS, case.dp * case.accum, MICRO_BATCH, SEQ_LEN + 1), generator=gen)


def micro_loss(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert "aux_loss" in out.losses and "z_loss" in out.losses
    return loss + sum(out.losses.values())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered to what an unsharded rank holds (collective); else itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _snapshot(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: _full(p.grad.detach()).clone() for n, p in model.named_parameters() if p.grad is not None}


def _adamw(model: Transformer, case: Case) -> torch.optim.Optimizer:
    from moe_dist.train.adamw_bf16_moments import AdamWBf16Moments
    from moe_dist.train.optim import adamw_implementation

    if case.optimizer_state_dtype == "bf16":
        return AdamWBf16Moments(model.parameters(), lr=LR, weight_decay=0.1)
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1,
                             **adamw_implementation(case.optimizer_impl, prefer_fused=False))


def run_reference(case: Case) -> RunRecord:
    from moe_dist.train.plan import LocalPlan

    model = build_model(case)
    plan = LocalPlan(model)
    opt = _adamw(model, case)
    batches = global_batches(case)
    record = RunRecord()
    n_micro = case.dp * case.accum
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        losses = []
        for j in range(n_micro):
            loss = micro_loss(model, batches[step, j])
            (loss / n_micro).backward()
            losses.append(loss.item())
        record.norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        record.losses.append(losses)
        record.grads.append(_snapshot(model))
        opt.step()
        plan.after_optimizer_step(model)
    record.params = {n: p.detach().clone() for n, p in model.named_parameters()}
    record.kept = _kept(model)
    record.bias = _bias(model)
    return record


def _kept(model: Transformer) -> torch.Tensor:
    return torch.stack([layer.stats.kept.clone() for _, layer in model.moe_layers()])


def _bias(model: Transformer) -> torch.Tensor:
    return torch.stack([layer.router.expert_bias.clone() for _, layer in model.moe_layers()])


def _bias_of_every_rank(bias: torch.Tensor, world_size: int) -> torch.Tensor:
    """[world, ...]: every rank's bias, gathered over the whole world (collective)."""
    import torch.distributed as dist

    gathered = [torch.empty_like(bias) for _ in range(world_size)]
    dist.all_gather(gathered, bias.contiguous())
    return torch.stack(gathered)


def run_rank(rank: int, world_size: int, case: Case) -> RunRecord:
    """One rank of the distributed run (called inside the spawned process)."""
    from moe_dist.models.expert_parallel import host_sync_count
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.plan import parallelize

    from moe_dist.distributed.param_tags import tp_shard_dim

    parallel = ParallelConfig(dp=case.dp, tp=case.tp, ep=case.ep, etp=case.etp, fsdp=case.fsdp)
    mesh = build_mesh(parallel, world_size, "cpu")
    model = build_model(case)
    plan = parallelize(model, mesh, parallel)
    opt = _adamw(model, case)
    batches = global_batches(case)
    record = RunRecord(expert_range=(mesh.local_experts(case.num_experts).start,
                                     mesh.local_experts(case.num_experts).stop), tp_rank=mesh.tp_rank,
                       etp_rank=mesh.etp_rank)
    record.tp_shards = {n: tp_shard_dim(p) for n, p in model.named_parameters() if tp_shard_dim(p) is not None}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        losses = []
        for m in range(case.accum):
            last = m == case.accum - 1
            with (plan.no_sync() if not last else _null()):
                loss = micro_loss(model, batches[step, m * case.dp + mesh.dp_rank])
                (loss / case.accum).backward()
            losses.append(loss.item())
        plan.finish_gradient_sync()
        record.norms.append(plan.clip_grad_norm_(MAX_NORM).item())
        record.losses.append(losses)
        record.grads.append(_snapshot(model))
        opt.step()
        plan.after_optimizer_step(model)
    record.params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    record.host_syncs = host_sync_count(model)
    record.kept = _kept(model)
    record.bias = _bias(model)
    record.bias_of_every_rank = _bias_of_every_rank(record.bias, world_size)
    if hasattr(plan, "reducer"):
        plan.reducer.remove_hooks()
    return record


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_cases(rank: int, world_size: int, cases: list[Case]) -> list[RunRecord]:
    """Spawned-process entry: run every case in order (one process start for all).

    Tensors go back as numpy arrays: torch tensors would travel as shared-memory handles that
    die with the process.
    """
    return [_to_numpy(run_rank(rank, world_size, case)) for case in cases]


def _to_numpy(rec: RunRecord) -> RunRecord:
    rec.grads = [{n: g.numpy() for n, g in step.items()} for step in rec.grads]
    rec.params = {n: p.numpy() for n, p in rec.params.items()}
    rec.kept = rec.kept.numpy()
    rec.bias, rec.bias_of_every_rank = rec.bias.numpy(), rec.bias_of_every_rank.numpy()
    return rec


def from_numpy(rec: RunRecord) -> RunRecord:
    rec.grads = [{n: torch.from_numpy(g) for n, g in step.items()} for step in rec.grads]
    rec.params = {n: torch.from_numpy(p) for n, p in rec.params.items()}
    rec.kept = torch.from_numpy(rec.kept)
    rec.bias, rec.bias_of_every_rank = torch.from_numpy(rec.bias), torch.from_numpy(rec.bias_of_every_rank)
    return rec


def is_expert_name(name: str) -> bool:
    return ".experts." in name


def _final_atol(case: Case) -> float:
    """Final parameters: fp32 rounding, or with bf16 moments one bf16 ulp of the moment in one of
    the steps (gradients equal to 1e-7 can round to neighbouring bf16 values): lr x 2^-8 x STEPS."""
    return LR * 2 ** -8 * STEPS if case.optimizer_state_dtype == "bf16" else 1e-5


def check_against_reference(case: Case, ranks: list[RunRecord], ref: RunRecord, world_size: int) -> None:
    """Losses of every micro-batch, grad norm, every gradient and the final parameters."""
    from moe_dist.distributed.mesh import MeshLayout

    layout = MeshLayout(world_size=world_size, dp=case.dp, tp=case.tp, ep=case.ep, etp=case.etp)
    ranks = [from_numpy(rec) for rec in ranks]
    # Expert-load counters stay indexed by global expert id: their sum over the ranks that route
    # different tokens (dp, and tp: each tp rank routes its own slice) is the reference's count.
    torch.testing.assert_close(sum(rec.kept for rec in ranks), ref.kept, rtol=0, atol=0)
    if case.force_experts:
        others = [e for e in range(case.num_experts) if e not in case.force_experts]
        assert ref.kept[:, others].sum() == 0 and (ref.kept[:, list(case.force_experts)] > 0).all()
    check_bias(case, ranks, ref)
    for rank, rec in enumerate(ranks):
        dp_rank = layout.coords(rank)["dp"]
        start, stop = rec.expert_range
        for step in range(STEPS):
            got = torch.tensor(rec.losses[step])
            want = torch.tensor([ref.losses[step][m * case.dp + dp_rank] for m in range(case.accum)])
            torch.testing.assert_close(got, want, msg=lambda m: f"{case.name} rank {rank} step {step} loss: {m}")
            torch.testing.assert_close(rec.norms[step], ref.norms[step], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{case.name} rank {rank} step {step} grad norm: {m}")
            assert set(rec.grads[step]) == set(ref.grads[step]), f"{case.name}: gradient names differ"
            for name, grad in rec.grads[step].items():
                want_grad = _shard_of(ref.grads[step][name], name, rec, case)
                torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{case.name} rank {rank} step {step} grad {name}: {m}")
        # Adam divides by sqrt(v): where a gradient is near eps, fp32 rounding differences in
        # the gradient move the update by up to ~lr * 1e-4, hence the looser absolute bound.
        for name, param in rec.params.items():
            want_param = _shard_of(ref.params[name], name, rec, case)
            torch.testing.assert_close(param, want_param, rtol=1e-4, atol=_final_atol(case),
                                       msg=lambda m: f"{case.name} rank {rank} final {name}: {m}")


def check_bias(case: Case, ranks: list[RunRecord], ref: RunRecord) -> None:
    """The selection bias after the last step, exactly: every rank holds what every other rank
    gathered from it, and that is the single-process reference's bias (the update is a sign of
    integer counts summed over the token ranks, so no rounding may differ)."""
    for rank, rec in enumerate(ranks):
        for other, seen in enumerate(rec.bias_of_every_rank):
            torch.testing.assert_close(seen, rec.bias, rtol=0, atol=0,
                                       msg=lambda m: f"{case.name}: rank {other}'s bias seen by rank {rank}: {m}")
        torch.testing.assert_close(rec.bias, ref.bias, rtol=0, atol=0,
                                   msg=lambda m: f"{case.name} rank {rank} bias vs the single process: {m}")
    if case.bias_rate > 0:  # it moved: STEPS is odd, so a bias is 0 only if a count tied the mean
        assert (ref.bias.abs() > 0).any(), f"{case.name}: the bias never moved: {ref.bias}"


def _shard_of(full: torch.Tensor, name: str, rec: RunRecord, case: Case) -> torch.Tensor:
    """This rank's piece of a reference tensor: its experts (and their etp block), or its tp shard."""
    if is_expert_name(name):
        from moe_dist.distributed.param_tags import take_etp_shard

        experts = full[rec.expert_range[0]:rec.expert_range[1]]
        if case.etp > 1:  # w13 [E, D, 2F]: gate and up split alone; w2 [E, F, D]
            dim, parts = (2, 2) if name.endswith("w13") else (1, 1)
            experts = take_etp_shard(experts, dim, parts, rec.etp_rank, case.etp)
        return experts
    if name in rec.tp_shards:
        return full.chunk(case.tp, dim=rec.tp_shards[name])[rec.tp_rank]
    return full
