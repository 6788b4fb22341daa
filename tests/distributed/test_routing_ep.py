"""Variable-k routers, dynamic/controller capacity and DynMoE growth under expert parallelism.

Every rank builds the same MoE layer (same seed), keeps an unsharded copy as its single-process
reference and shards the other with ``apply_ep``. On the rank's own tokens the sharded layer must
give the reference's output, input and router gradients; an expert's gradient is the sum over
ranks of the references' gradients for that expert (its tokens come from every rank). Dynamic
capacity must equal the largest per-expert count over the ep group (bounded by Tutel's factor),
and DynMoE decisions must be identical on every rank and survive a checkpoint round trip.

The cases with ``bias_update_rate`` then run a few routing rounds with the auxiliary-loss-free
bias: each round every rank routes its own new tokens and the bias is updated from the counts
summed over the token ranks; a single layer that routes every rank's tokens itself is the
reference. The biases must be bit-identical on every rank and equal to the reference's, and the
last round's outputs (routed with the moved bias) equal the reference's on the same tokens.
"""

from __future__ import annotations

from harness import run_distributed

DIM, FFN, SEQ = 8, 16, 6

CASES = [
    ("top_p_dropless", dict(type="top_p", top_k=4, top_p=0.5, bias_update_rate=1e-2), dict(policy="dropless")),
    ("xmoe_dynamic", dict(type="xmoe", top_k=4, xmoe_threshold=0.8), dict(policy="dynamic", capacity_factor=0.0)),
    ("xmoe_bias", dict(type="xmoe", top_k=4, xmoe_threshold=0.5, bias_update_rate=1e-2), dict(policy="dropless")),
    ("top_p_dynamic_bounded", dict(type="top_p", top_k=4, top_p=0.6),
     dict(policy="dynamic", capacity_factor=0.5)),
    ("da_moe_controller", dict(type="da_moe", top_k=3), dict(policy="controller", capacity_factor=0.75)),
    ("expert_choice", dict(type="expert_choice"), dict(policy="dropless")),
    ("top_any", dict(type="top_any", top_k=4), dict(policy="dynamic", capacity_factor=0.0)),
]


def _parity_body(rank: int, world_size: int, ep: int, num_experts: int, cases) -> list[dict]:
    import copy

    import torch

    from moe_dist.config import CapacityConfig, MoEConfig, ParallelConfig, RouterConfig
    from moe_dist.distributed import comms
    from moe_dist.models.expert_parallel import apply_ep
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.moe.layer import MoELayer
    from moe_dist.moe.routing.state import update_after_step

    mesh = build_mesh(ParallelConfig(dp=world_size, ep=ep), world_size, "cpu")
    report = []
    for name, router_kw, capacity_kw in cases:
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=num_experts, router=RouterConfig(**router_kw),
                        capacity=CapacityConfig(**capacity_kw))
        layer = MoELayer(DIM, FFN, cfg)
        reference = copy.deepcopy(layer)
        apply_ep(layer, mesh)  # also injects layer.capacity_reduce_fn (MAX over the ep group)

        torch.manual_seed(100 + rank)
        x = torch.randn(2, SEQ, DIM)
        probe = torch.randn(2, SEQ, DIM)
        outputs = {}
        for tag, module in (("ep", layer), ("ref", reference)):
            x_in = x.clone().requires_grad_(True)
            y, losses = module(x_in)
            ((y * probe).sum() + sum(losses.values(), torch.zeros(()))).backward()
            outputs[tag] = (y.detach(), x_in.grad, losses)
        torch.testing.assert_close(outputs["ep"][0], outputs["ref"][0], msg=f"{name}: output")
        torch.testing.assert_close(outputs["ep"][1], outputs["ref"][1], msg=f"{name}: input grad")
        assert outputs["ep"][2].keys() == outputs["ref"][2].keys()
        torch.testing.assert_close(layer.router.weight.grad, reference.router.weight.grad, msg=f"{name}: router grad")
        local = mesh.local_experts(num_experts)
        for param in ("w13", "w2"):
            summed = comms.all_reduce(getattr(reference.experts, param).grad.clone(), "sum", mesh.ep_group)
            torch.testing.assert_close(getattr(layer.experts, param).grad, summed[local.start:local.stop],
                                       msg=f"{name}: expert {param} grad")

        entry = {"name": name, "kept": int(layer.stats.kept.sum()), "routed": int(layer.stats.routed.sum())}
        if capacity_kw["policy"] == "dynamic":
            busiest = reference.stats.routed.max().reshape(1).clone()
            comms.all_reduce(busiest, "max", mesh.ep_group)
            entry["capacity"] = layer.capacity_state.last_capacity
            entry["group_max"] = int(busiest)
            entry["reference_capacity"] = reference.capacity_state.last_capacity
        if capacity_kw["policy"] == "controller":
            update_after_step(layer, lambda t: comms.all_reduce(t, "sum", mesh.dp_group))
            entry["factor"] = layer.capacity_state.factor
        if router_kw.get("bias_update_rate", 0) > 0:
            entry["bias"] = _bias_rounds(name, cfg, mesh, rank, world_size)
        report.append(entry)
    return report


BIAS_ROUNDS = 3


def _bias_rounds(name: str, cfg, mesh, rank: int, world_size: int) -> list[float]:
    """Auxiliary-loss-free bias under EP against one layer that routes every rank's tokens (see the
    module docstring); returns the final bias."""
    import torch
    import torch.distributed as dist

    from moe_dist.distributed import comms
    from moe_dist.models.expert_parallel import apply_ep
    from moe_dist.moe.layer import MoELayer
    from moe_dist.moe.routing.state import update_selection_bias_from_stats

    def fresh() -> MoELayer:
        torch.manual_seed(0)
        return MoELayer(DIM, FFN, cfg)

    layer, solo = apply_ep(fresh(), mesh), fresh()
    moved = False
    for round_ in range(BIAS_ROUNDS):
        tokens = [torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(1000 * round_ + r))
                  for r in range(world_size)]
        y, _ = layer(tokens[rank])
        y_solo = [solo(x)[0] for x in tokens]  # one process, every rank's tokens
        if round_ == BIAS_ROUNDS - 1:  # routed with the bias of the earlier rounds
            torch.testing.assert_close(y, y_solo[rank], msg=f"{name}: output with the bias, round {round_}")
        update_selection_bias_from_stats(layer, lambda t: comms.all_reduce(t, "sum", mesh.dp_group))
        update_selection_bias_from_stats(solo)
        bias = layer.router.expert_bias
        every = [torch.empty_like(bias) for _ in range(world_size)]
        dist.all_gather(every, bias)
        for other, seen in enumerate(every):
            torch.testing.assert_close(seen, solo.router.expert_bias, rtol=0, atol=0,
                                       msg=f"{name}: rank {other}'s bias after round {round_}")
        moved = moved or bool(bias.abs().max() > 0)
    assert moved, f"{name}: the bias never moved"
    return bias.tolist()


def _check_parity_report(results, world_size: int, cases) -> None:
    from moe_dist.moe.capacity_dynamic import tutel_capacity

    for i, (name, _, capacity_kw) in enumerate(cases):
        per_rank = [r[i] for r in results]
        if capacity_kw["policy"] == "dynamic":
            # every dynamic case has E = 4 experts and Kmax = top_k = 4 slots
            bound = (tutel_capacity(2 * SEQ, 4, 4, capacity_kw["capacity_factor"])
                     if capacity_kw["capacity_factor"] > 0 else None)
            for entry in per_rank:
                expected = entry["group_max"] if bound is None else min(entry["group_max"], bound)
                assert entry["capacity"] == expected, (name, entry)
            assert len({e["capacity"] for e in per_rank}) == 1, (name, per_rank)
            if bound is not None:  # the bound really drops here
                assert sum(e["routed"] - e["kept"] for e in per_rank) > 0, (name, per_rank)
            else:
                assert all(e["routed"] == e["kept"] for e in per_rank), (name, per_rank)
        if capacity_kw["policy"] == "controller":
            assert len({e["factor"] for e in per_rank}) == 1, (name, per_rank)  # identical on every rank


def test_variable_k_and_dynamic_capacity_match_the_reference_ep2():
    results = run_distributed(_parity_body, 2, 2, 4, CASES, timeout=120)
    _check_parity_report(results, 2, CASES)


def test_dynamic_capacity_is_the_group_max_ep4():
    cases = [case for case in CASES if case[0] in ("xmoe_dynamic", "top_p_dynamic_bounded", "top_any")]
    results = run_distributed(_parity_body, 4, 4, 4, cases, timeout=120)
    _check_parity_report(results, 4, cases)
    # the ranks' own busiest experts differ, yet all agree on the group's maximum
    xmoe = [r[0] for r in results]
    assert len({e["capacity"] for e in xmoe}) == 1 and xmoe[0]["capacity"] >= max(e["reference_capacity"] for e in xmoe)


def _dynmoe_body(rank: int, world_size: int) -> dict:
    import io

    import torch
    import torch.nn.functional as F

    from moe_dist.config import AdaptiveConfig, MoEConfig, ParallelConfig, RouterConfig
    from moe_dist.distributed import comms
    from moe_dist.models.expert_parallel import apply_ep
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.moe.routing import adaptive
    from moe_dist.moe.layer import MoELayer

    mesh = build_mesh(ParallelConfig(dp=world_size, ep=2), world_size, "cpu")

    def build() -> MoELayer:
        torch.manual_seed(0)
        router = RouterConfig(type="top_any", top_k=4, adaptive=AdaptiveConfig(
            enabled=True, initial_experts=2, update_every=2, record_steps=0))
        layer = MoELayer(DIM, FFN, MoEConfig(num_experts=4, router=router))
        with torch.no_grad():
            layer.router.weight.copy_(torch.eye(4, DIM))
        return apply_ep(layer, mesh)

    def sum_over_token_ranks(t):
        return comms.all_reduce(t, "sum", mesh.dp_group)

    layer = build()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    routed = torch.zeros(3, DIM)
    routed[:, 0] = routed[:, 1] = 1.0  # activates both initial experts (a fallback would not count)
    unrouted = torch.zeros(3, DIM)
    unrouted[:, 0], unrouted[:, 1], unrouted[:, 5] = -1.0, -1.0, torch.tensor([1.0, 2.0, 3.0])
    tokens = routed if rank == 0 else unrouted  # only rank 1 sees tokens without an expert
    for _ in range(2):
        layer.train()
        out, losses = layer(tokens.view(1, 3, DIM))
        optimizer.zero_grad()
        (out.sum() + sum(losses.values())).backward()
        optimizer.step()
        adaptive.update_adaptive_experts(layer, sum_over_token_ranks)
        resets = adaptive.reset_pending_optimizer_state(layer, optimizer)
    expected = F.normalize(unrouted.sum(0), dim=0)
    torch.testing.assert_close(layer.router.weight[2].detach(), expected)
    new_rows_zero = None
    if 2 in mesh.local_experts(4):
        new_rows_zero = bool(optimizer.state[layer.experts.w13]["exp_avg"][2 - mesh.local_experts(4).start]
                             .abs().sum() == 0)

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = build()
    restored.load_state_dict(torch.load(buffer))
    y_restored, _ = restored(unrouted.view(1, 3, DIM))
    y_layer, _ = layer(unrouted.view(1, 3, DIM))
    torch.testing.assert_close(y_restored, y_layer)
    return {"active": layer.router.active.tolist(), "restored": restored.router.active.tolist(),
            "resets": resets, "new_rows_zero": new_rows_zero,
            "routed_to_new": int(layer.router(unrouted).tokens_per_expert[2])}


def test_dynmoe_growth_is_identical_on_every_rank_and_checkpointed():
    results = run_distributed(_dynmoe_body, 2, timeout=120)
    for r in results:
        assert r["active"] == [True, True, True, False], r
        assert r["restored"] == r["active"]
        assert r["resets"] == [(0, 2)]
        assert r["routed_to_new"] == 3
    assert [r["new_rows_zero"] for r in results] == [None, True]  # rank 1 holds slots 2 and 3
