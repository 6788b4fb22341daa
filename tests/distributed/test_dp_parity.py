"""Data-parallel gradient reduction on gloo against the single-process model.

* dp=2 without EP, and ep=2 with 2 accumulation micro-batches per rank (no_sync on the first):
  3 AdamW steps, every loss, clipped grad norm, gradient and final parameter compared; with
  ``bias_rate`` the auxiliary-loss-free bias is updated after every step and must be bit-identical
  on every rank and equal to the reference's.
* The reducer's own contract, in one 2-rank run: small buckets (several per group) launched
  from the backward hooks in bucket order, a forgotten ``no_sync`` raises, and the grad norm
  counts replicated dense grads once and expert shards summed over ep.
"""

from __future__ import annotations

import torch
from harness import run_distributed
from parity import Case, build_model, check_against_reference, micro_loss, run_cases, run_reference

CASES = [
    Case("dp2", dp=2, ep=1),
    Case("ep2_accum2", dp=2, ep=2, accum=2),
    Case("ep2_accum2_capacity", dp=2, ep=2, accum=2, capacity=True),
    Case("dp2_bias", dp=2, ep=1, bias_rate=1e-2),  # aux-free bias: identical on both ranks, = reference
]


def test_dp_parity_world2():
    results = run_distributed(run_cases, 2, CASES, timeout=120)
    for i, case in enumerate(CASES):
        check_against_reference(case, [per_rank[i] for per_rank in results], run_reference(case), 2)


def _reducer_contract(rank: int, world_size: int) -> dict:
    from moe_dist.config import ParallelConfig
    from moe_dist.distributed import comms
    from moe_dist.distributed.grad_sync import GradReducer, grad_norm
    from moe_dist.distributed.param_tags import is_expert_param
    from moe_dist.models.expert_parallel import apply_ep
    from moe_dist.distributed.mesh import build_mesh

    case = Case("contract", dp=2, ep=2)
    mesh = build_mesh(ParallelConfig(dp=2, ep=2), world_size, "cpu")
    model = apply_ep(build_model(case), mesh)
    reducer = GradReducer(model, mesh, bucket_mb=0.01)  # ~10 KB: many buckets
    launched_in_hooks = []
    original_launch = reducer._launch

    def spy(bucket):
        launched_in_hooks.append(reducer.buckets.index(bucket))
        original_launch(bucket)

    reducer._launch = spy
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    micro_loss(model, tokens).backward()
    during_backward = list(launched_in_hooks)
    reducer.finish()

    # Forgetting no_sync on a non-final micro-batch must not silently double-reduce.
    micro_loss(model, tokens).backward()
    try:
        micro_loss(model, tokens).backward()
        raised = False
    except RuntimeError as exc:
        raised = "no_sync" in str(exc)
    reducer.discard()

    # Norm: dense part equal on both ranks; expert part summed over ep by hand.
    for p in model.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    dense_sq = sum(p.numel() * (rank + 1) ** 2 for p in model.parameters() if not is_expert_param(p))
    expert_sq = torch.tensor(float(sum(p.numel() * (rank + 1) ** 2
                                       for p in model.parameters() if is_expert_param(p))))
    comms.all_reduce(expert_sq, "sum", mesh.ep_group)
    return {"buckets": len(reducer.buckets), "during_backward": during_backward, "raised": raised,
            "norm": grad_norm(model.parameters(), mesh).item(),
            "expected_norm": (dense_sq + expert_sq.item()) ** 0.5}


def test_reducer_buckets_hooks_and_norm():
    results = run_distributed(_reducer_contract, 2, timeout=60)
    for rank, res in enumerate(results):
        assert res["buckets"] > 4, res
        # Launched from the hooks, strictly in bucket order, all before finish().
        assert res["during_backward"] == list(range(res["buckets"])), res
        assert res["raised"], f"rank {rank}: a second backward without no_sync did not raise"
        torch.testing.assert_close(res["norm"], res["expected_norm"], rtol=1e-6, atol=0)
