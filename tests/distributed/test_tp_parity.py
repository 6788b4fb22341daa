"""Tensor (+ sequence) parallelism against the single-process model, on CPU gloo.

Every rank builds the reference model and the TP model from the same seed, trains both for a
few AdamW steps on the same batches, and compares the loss, every gradient (TP shards gathered
over the tp group, partial grads summed over tp by the gradient reducer) and the weights.
The MoE model has balancing, sequence-balancing and z losses switched on and a shared expert,
so router-loss sharing and every partial-gradient mark are exercised, and an auxiliary-loss-free
bias updated after every step (the plans' ``after_optimizer_step``, as the trainers call it): it
must stay bit-identical on every rank and equal to the reference's.
megatron-core's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding serve as an
independent cross-check of our sharded layers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_distributed
from torch.testing import assert_close

from moe_dist.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moe_dist.distributed.mesh import MeshLayout, ParallelMesh, build_mesh
from moe_dist.distributed.param_tags import is_tp_partial_grad, tp_shard_dim
from moe_dist.models.tensor_parallel import apply_tp, vocab_parallel_cross_entropy
from moe_dist.models.transformer import Transformer

VOCAB, SEQ, BATCH, STEPS = 64, 8, 2, 3
TOL = {"rtol": 1e-4, "atol": 1e-5}
BIAS_RATE = 1e-2


def _configs(moe: bool) -> tuple[ModelConfig, MoEConfig]:
    model_cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=16)
    router = RouterConfig(top_k=2, aux_loss_coef=0.1, seq_aux_loss_coef=0.05, z_loss_coef=0.01,
                          bias_update_rate=BIAS_RATE)
    moe_cfg = MoEConfig(num_experts=4 if moe else 0, every=1, num_shared_experts=1 if moe else 0,
                        router=router)
    return model_cfg, moe_cfg


def _build(moe: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(*_configs(moe))


def _batch(step: int, shard: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + shard)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(model: Transformer, step: int, shard: int = 0, vocab_parallel_group=None) -> torch.Tensor:
    inputs, targets = _batch(step, shard)
    out = model(inputs)
    if vocab_parallel_group is not None:
        lm = vocab_parallel_cross_entropy(out.logits, targets, vocab_parallel_group)
    else:
        lm = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    return lm + sum(out.losses.values())


def _gather(t: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """The full tensor of a tp shard (dim None: not sharded)."""
    if dim is None:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim)


def _compare(ref: Transformer, tp: Transformer, mesh: ParallelMesh, what: str, grads: bool) -> None:
    ref_params = dict(ref.named_parameters())
    names = [name for name, _ in tp.named_parameters()]
    assert sorted(names) == sorted(ref_params), f"{what}: parameter names changed"
    for name, param in tp.named_parameters():
        expected = ref_params[name].grad if grads else ref_params[name].detach()
        local = param.grad if grads else param
        if getattr(param, "_moe_expert", False) and mesh.ep_size > 1:
            held = mesh.local_experts(ref.moe_cfg.num_experts)
            expected = expected[held.start:held.stop]
        got = _gather(local, tp_shard_dim(param), mesh.tp_group)
        assert_close(got, expected, **TOL, msg=lambda m, n=name: f"{what} {n}: {m}")


def _after_steps(ref: Transformer, model: Transformer, mesh: ParallelMesh, reducer):
    """The routing-state update each trainer runs after its optimizer step, for both models."""
    from moe_dist.train.plan import DistributedPlan, LocalPlan

    ref_plan, plan = LocalPlan(ref), DistributedPlan(model, mesh, reducer)

    def update() -> None:
        ref_plan.after_optimizer_step(ref)
        plan.after_optimizer_step(model)
    return update


def _compare_bias(ref: Transformer, model: Transformer, what: str) -> bool:
    """Every rank's selection biases, all-gathered, equal each other and the reference's exactly.
    Returns whether the bias is non-zero (with rate 1e-2 this tiny model's bias oscillates and can
    return to 0, so callers check after every step that it moved at least once)."""
    biases = [(layer.router.expert_bias, ref_layer.router.expert_bias)
              for (_, layer), (_, ref_layer) in zip(model.moe_layers(), ref.moe_layers())]
    for got, want in biases:
        every = [torch.empty_like(got) for _ in range(dist.get_world_size())]
        dist.all_gather(every, got)
        for rank, seen in enumerate(every):
            assert_close(seen, want, rtol=0, atol=0, msg=lambda m, r=rank: f"{what}: rank {r}'s bias: {m}")
    return any(bool(want.abs().max() > 0) for _, want in biases)


def _train_and_compare(mesh: ParallelMesh, moe: bool, sequence_parallel: bool,
                       gather_logits: bool = True) -> list[float]:
    from moe_dist.distributed.grad_sync import GradReducer
    from moe_dist.models.expert_parallel import apply_ep

    what = f"moe={moe} sp={sequence_parallel} gather_logits={gather_logits}"
    ref = _build(moe)
    tp = apply_tp(_build(moe), mesh, ParallelConfig(tp=2, sequence_parallel=sequence_parallel),
                  gather_logits=gather_logits)
    # ep=1: apply_ep only tags the (replicated) experts; the reducer sums their grads over edp,
    # which here is the tp group, because each tp rank routed its own tokens.
    reducer = GradReducer(apply_ep(tp, mesh), mesh)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-3, weight_decay=0.1)
    after_step = _after_steps(ref, tp, mesh, reducer)
    losses, moved = [], []
    for step in range(STEPS):
        opt_ref.zero_grad()
        opt_tp.zero_grad()
        loss_ref = _loss(ref, step)
        loss_ref.backward()
        loss_tp = _loss(tp, step, vocab_parallel_group=None if gather_logits else mesh.tp_group)
        loss_tp.backward()
        reducer.finish()  # also sums the tp-partial grads (norms, routers) over the tp group
        assert_close(loss_tp, loss_ref, **TOL, msg=lambda m, s=step: f"{what} step {s} loss: {m}")
        _compare(ref, tp, mesh, f"{what} step {step} grad", grads=True)
        opt_ref.step()
        opt_tp.step()
        after_step()
        if moe:
            moved.append(_compare_bias(ref, tp, f"{what} step {step}"))
        losses.append(loss_tp.item())
    _compare(ref, tp, mesh, f"{what} after {STEPS} AdamW steps, weight", grads=False)
    assert any(moved) or not moe, f"{what}: the bias never moved"
    reducer.remove_hooks()
    if moe:  # tp ranks routed disjoint tokens: their counters add up to the reference's
        for (_, layer_ref), (_, layer_tp) in zip(ref.moe_layers(), tp.moe_layers()):
            routed = layer_tp.stats.routed.clone()
            dist.all_reduce(routed, group=mesh.tp_group)
            assert_close(routed, layer_ref.stats.routed, rtol=0, atol=0)
    partial = sorted(n for n, p in tp.named_parameters() if is_tp_partial_grad(p))
    expected = [n for n, _ in tp.named_parameters()
                if "router" in n or "shared_experts" in n or (sequence_parallel and "norm" in n)]
    assert partial == sorted(expected), f"{what}: partial-grad marks {partial}"
    return losses


def _tp2_body(rank: int, world_size: int) -> dict[str, list[float]]:
    mesh = build_mesh(ParallelConfig(tp=2), world_size, "cpu")
    out = {}
    for moe in (False, True):
        for sp in (True, False):
            out[f"moe={moe} sp={sp}"] = _train_and_compare(mesh, moe, sp)
    out["vocab_parallel_ce"] = _train_and_compare(mesh, True, True, gather_logits=False)

    # vocab-parallel cross-entropy alone, per token, against F.cross_entropy
    logits = torch.randn(5, 3, VOCAB, generator=torch.Generator().manual_seed(7), requires_grad=True)
    targets = torch.randint(0, VOCAB, (5, 3), generator=torch.Generator().manual_seed(8))
    local = logits.detach().chunk(2, dim=-1)[mesh.tp_rank].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, targets, mesh.tp_group, reduction="none")
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(5, 3)
    assert_close(got, want, **TOL)
    (got * torch.arange(15.0).view(5, 3)).sum().backward()
    (want * torch.arange(15.0).view(5, 3)).sum().backward()
    assert_close(local.grad, logits.grad.chunk(2, dim=-1)[mesh.tp_rank], **TOL)
    return out


def test_tp2_parity_dense_and_moe_with_and_without_sequence_parallel() -> None:
    results = run_distributed(_tp2_body, 2, timeout=90)
    assert results[0] == results[1]  # every tp rank reports the same loss
    for losses in results[0].values():
        assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def _tp2_ep2_body(rank: int, world_size: int) -> dict[str, list[float]]:
    from moe_dist.distributed.grad_sync import GradReducer
    from moe_dist.models.expert_parallel import apply_ep

    out = {}
    for sp in (True, False):
        parallel = ParallelConfig(tp=2, ep=2, sequence_parallel=sp)
        mesh = build_mesh(parallel, world_size, "cpu")
        ref = _build(moe=True)
        model = apply_ep(apply_tp(_build(moe=True), mesh, parallel), mesh)
        reducer = GradReducer(model, mesh)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        after_step = _after_steps(ref, model, mesh, reducer)
        losses, moved = [], []
        for step in range(2):
            opt_ref.zero_grad()
            opt.zero_grad()
            # Reference: the global batch is the dp shards' micro-batches, averaged.
            loss_ref = sum(_loss(ref, step, shard) for shard in range(mesh.dp_size)) / mesh.dp_size
            loss_ref.backward()
            loss = _loss(model, step, shard=mesh.dp_rank)
            loss.backward()
            reducer.finish()
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss, group=mesh.dp_group)
            assert_close(global_loss / mesh.dp_size, loss_ref, **TOL)
            _compare(ref, model, mesh, f"tp2 x ep2 sp={sp} step {step} grad", grads=True)
            opt_ref.step()
            opt.step()
            after_step()
            moved.append(_compare_bias(ref, model, f"tp2 x ep2 sp={sp} step {step}"))
            losses.append(global_loss.item() / mesh.dp_size)
        _compare(ref, model, mesh, f"tp2 x ep2 sp={sp} weight", grads=False)
        assert any(moved), f"tp2 x ep2 sp={sp}: the bias never moved"
        reducer.remove_hooks()
        out[f"sp={sp}"] = losses
    return out


def test_tp2_ep2_parity_on_four_ranks() -> None:
    results = run_distributed(_tp2_ep2_body, 4, timeout=120)
    assert all(r == results[0] for r in results)


def _megatron_body(rank: int, world_size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tensor_parallel import (
            ColumnParallelLinear,
            RowParallelLinear,
            VocabParallelEmbedding,
        )
        from megatron.core.transformer import TransformerConfig

    mesh = build_mesh(ParallelConfig(tp=2), world_size, "cpu")
    group = mesh.tp_group
    ours = apply_tp(_build(moe=False), mesh, ParallelConfig(tp=2, sequence_parallel=False))
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            tensor_model_parallel_size=2, use_cpu_initialization=True)
    mlp = ours.layers[0].mlp
    dim, ffn = 32, ours.model_cfg.ffn_dim

    def column(weight):
        layer = ColumnParallelLinear(dim, ffn, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                     gather_output=False, tp_group=group)
        layer.weight.data.copy_(weight.detach())
        return layer

    w1, w3 = column(mlp.w1.weight), column(mlp.w3.weight)
    w2 = RowParallelLinear(ffn, dim, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                           input_is_parallel=True, skip_bias_add=False, tp_group=group)
    w2.weight.data.copy_(mlp.w2.weight.detach())
    emb = VocabParallelEmbedding(VOCAB, dim, init_method=torch.nn.init.zeros_, config=cfg, tp_group=group)
    emb.weight.data.copy_(ours.tok_embeddings.weight.detach())

    tokens, _ = _batch(0)
    assert_close(ours.tok_embeddings(tokens), emb(tokens), **TOL)

    x = torch.randn(BATCH, SEQ, dim, generator=torch.Generator().manual_seed(3))
    x_ours, x_meg = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()  # megatron: [S, B, D]
    y_ours = mlp(x_ours)
    h1, _ = w1(x_meg)
    h3, _ = w3(x_meg)
    y_meg, _ = w2(F.silu(h1) * h3)
    assert_close(y_ours, y_meg.transpose(0, 1), **TOL)
    y_ours.square().sum().backward()
    y_meg.square().sum().backward()
    assert_close(x_ours.grad, x_meg.grad.transpose(0, 1), **TOL)
    for mine, theirs in ((mlp.w1, w1), (mlp.w3, w3), (mlp.w2, w2)):
        assert_close(mine.weight.grad, theirs.weight.grad, **TOL)


def test_sharded_layers_match_megatron_core() -> None:
    run_distributed(_megatron_body, 2, timeout=90)


# ---- single process: no group needed -------------------------------------------------------

def test_vocab_parallel_cross_entropy_without_group_is_plain_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 4), generator=gen)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert_close(vocab_parallel_cross_entropy(logits, targets, None), want)
    assert_close(vocab_parallel_cross_entropy(logits, targets, None, reduction="sum"), want * 12)


def test_apply_tp_rejects_bad_sizes_before_touching_the_model() -> None:
    fake_tp3 = ParallelMesh(layout=MeshLayout(world_size=3, dp=1, tp=3, ep=1, etp=1), rank=0)
    model = _build(moe=False)
    before = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model.n_heads \(4\) must be divisible by parallel.tp \(3\)"):
        apply_tp(model, fake_tp3)
    assert {n: p.shape for n, p in model.named_parameters()} == before
    assert apply_tp(model, ParallelMesh.single()) is model
