"""Expert parallelism on gloo: 3 AdamW steps match the single-process model exactly (fp32).

Every rank's loss per micro-batch, the clipped global grad norm, every gradient (expert shards
against the slice of the reference's full tensor) and the final parameters are compared. The
4-process run covers ep=4, dp=4 x ep=2 (edp=2: expert grads summed over edp, divided by dp) in
both dispatch modes, and routing forced onto experts 0 and 1 so that three of four ranks receive
no token at all. The ``_bias`` cases move the auxiliary-loss-free bias after every step (rate
1e-2): it must stay bit-identical on every rank and equal to the reference's.
"""

from __future__ import annotations

from harness import run_distributed
from parity import Case, check_against_reference, run_cases, run_reference

WORLD2 = [
    Case("ep2_dropless", dp=2, ep=2),
    Case("ep2_capacity", dp=2, ep=2, capacity=True),
    Case("ep2_da_moe", dp=2, ep=2, router="da_moe"),  # K_t from each block's own attention
    Case("ep2_accum2_bias", dp=2, ep=2, accum=2, bias_rate=1e-2),
]
WORLD4 = [
    Case("ep4_dropless", dp=4, ep=4, num_experts=8),
    Case("dp4xep2_dropless_bf16_moments", dp=4, ep=2, optimizer_state_dtype="bf16"),
    Case("dp4xep2_capacity", dp=4, ep=2, capacity=True),
    Case("dp2xtp2xep2_dropless", dp=2, tp=2, ep=2),
    Case("dp2xtp2xep4_dropless", dp=2, tp=2, ep=4, num_experts=8),
    Case("dp2xtp2xep2_bias", dp=2, tp=2, ep=2, bias_rate=1e-2),
    Case("ep4_zero_tokens_dropless", dp=4, ep=4, num_experts=8, force_experts=(0, 1)),
    Case("ep4_zero_tokens_capacity", dp=4, ep=4, num_experts=8, capacity=True, force_experts=(0, 1)),
]


def _check_all(cases: list[Case], world_size: int, results) -> None:
    for i, case in enumerate(cases):
        ranks = [per_rank[i] for per_rank in results]
        check_against_reference(case, ranks, run_reference(case), world_size)
        syncs = [r.host_syncs for r in ranks]
        if case.capacity:
            assert syncs == [0] * world_size, f"{case.name}: capacity mode made host syncs {syncs}"
        else:
            # one per MoE layer (2) per forward (1 micro-batch x 3 steps)
            assert syncs == [2 * 3 * case.accum] * world_size, f"{case.name}: host syncs {syncs}"


def test_ep_parity_world2():
    results = run_distributed(run_cases, 2, WORLD2, timeout=120)
    _check_all(WORLD2, 2, results)


def test_ep_parity_world4():
    results = run_distributed(run_cases, 4, WORLD4, timeout=180)
    _check_all(WORLD4, 4, results)


def _unequal_capacity(rank: int, world_size: int) -> str:
    import torch

    from moe_dist.config import ParallelConfig
    from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher
    from moe_dist.distributed.mesh import build_mesh

    mesh = build_mesh(ParallelConfig(dp=2, ep=2), world_size, "cpu")
    dispatcher = AllToAllDispatcher(4, mesh.ep_group, mesh.ep_rank, mesh.ep_size,
                                    capacity_fn=lambda tokens, top_k: tokens * top_k // 4)
    num_tokens = 6 if rank == 0 else 10  # capacities 3 and 5
    x = torch.randn(num_tokens, 8)
    indices = torch.randint(0, 4, (num_tokens, 2))
    try:
        dispatcher.dispatch(x, indices, None)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_capacity_mode_rejects_unequal_batches_on_every_rank():
    messages = run_distributed(_unequal_capacity, 2, timeout=60)
    for message in messages:
        assert "same per-expert capacity" in message and "from 3 to 5" in message, message
