"""Research architectures under dp=2 x ep=2 on gloo against their single-process twin.

Each rank trains 2 AdamW steps on its own micro-batch of a global batch of 2; the reference
trains the same model in the pytest process on both micro-batches (loss / 2 each). Compared:
every micro-batch loss, the global grad norm, every gradient (expert shards against the slice of
the reference's full tensor) and the final parameters. SwitchAll's entropy regulariser is global
over dp, so its reference runs one forward on the union of the micro-batches. Sharded: SwitchAll's
sigma-MoE experts (ReLU), PEER's expert tables (rows fetched from their owner), MH-MoE's sub-token
experts and the stratified pool (passes agreed with a MIN all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from harness import run_distributed

from moe_dist.config import (CapacityConfig, MHMoEConfig, ModelConfig, MoEConfig, PEERConfig, RouterConfig,
                             StratifiedConfig, SwitchHeadConfig)
from moe_dist.models.registry import build

SEQ, MICRO, STEPS, LR, DP = 8, 2, 2, 1e-2, 2
CASES = ["switchall", "peer", "mh_moe", "stratified", "stratified_capacity"]


def build_case(name: str):
    torch.manual_seed(7)
    base = dict(vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=SEQ)
    router = RouterConfig(top_k=2)
    if name == "switchall":
        model = ModelConfig(arch="switchhead", switchhead=SwitchHeadConfig(n_heads=2, num_experts=3, switch_all=True),
                            **base)
        moe = MoEConfig(num_experts=4, every=1, expert_ffn_dim=8, router=router)
    elif name == "peer":
        model = ModelConfig(arch="peer", peer=PEERConfig(num_experts=64, heads=2, top_k=4, query_dim=8), **base)
        moe = MoEConfig(num_experts=4, every=2)
    elif name == "mh_moe":
        model = ModelConfig(arch="mh_moe", mh_moe=MHMoEConfig(heads=2, match_moe=False), **base)
        moe = MoEConfig(num_experts=4, every=1, expert_ffn_dim=8, router=router)
    else:
        # Factor 2 never drops here (C = 2*ceil(2*S/V) >= S for V <= 4 visible), so the agreed (group-max) capacity
        # and the twin's own capacity give the same outputs.
        capacity = CapacityConfig(policy="fixed", capacity_factor=2.0) if name.endswith("capacity") else CapacityConfig()
        model = ModelConfig(arch="stratified", stratified=StratifiedConfig(strata=[2, 2]), **base)
        moe = MoEConfig(num_experts=4, every=1, expert_ffn_dim=8, router=router, capacity=capacity)
    return build(model, moe)


def batches() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 32, (STEPS, DP, MICRO, SEQ + 1), generator=gen)


def micro_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    return loss + sum(out.losses.values())


def union_losses(model, tokens_RBS: torch.Tensor) -> list[torch.Tensor]:
    """Each rank's loss when the model's losses are global over the ranks' micro-batches."""
    out = model(tokens_RBS.flatten(0, 1)[:, :-1])
    logits = out.logits.view(DP, MICRO, SEQ, -1)
    extra = sum(out.losses.values())
    return [torch.nn.functional.cross_entropy(logits[r].flatten(0, 1), tokens_RBS[r, :, 1:].flatten()) + extra
            for r in range(DP)]


@dataclass
class Record:
    losses: list[list[float]] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    grads: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    expert_names: list[str] = field(default_factory=list)
    ep_rank: int = 0
    agreement_calls: int = 0


def _snapshot(model) -> dict:
    return {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters() if p.grad is not None}


def run_reference(name: str) -> Record:
    model = build_case(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    rec, data = Record(), batches()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if name == "switchall":  # its entropy regulariser is global over dp: one forward on the union
            losses = union_losses(model, data[step])
            (sum(losses) / DP).backward()
            losses = [loss.item() for loss in losses]
        else:
            losses = []
            for r in range(DP):
                loss = micro_loss(model, data[step, r])
                (loss / DP).backward()
                losses.append(loss.item())
        rec.losses.append(losses)
        rec.norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item())
        rec.grads.append(_snapshot(model))
        opt.step()
    rec.params = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    return rec


def _rank_body(rank: int, world_size: int, names: list[str]) -> list[Record]:
    from moe_dist.config import ParallelConfig
    from moe_dist.distributed.param_tags import is_expert_param
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.plan import parallelize
    from moe_dist.models.stratified import StratifiedMoELayer

    out = []
    for name in names:
        parallel = ParallelConfig(dp=DP, ep=2)
        mesh = build_mesh(parallel, world_size, "cpu")
        model = build_case(name)
        plan = parallelize(model, mesh, parallel)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
        rec, data = Record(ep_rank=mesh.ep_rank), batches()
        rec.expert_names = [n for n, p in model.named_parameters() if is_expert_param(p)]
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss = micro_loss(model, data[step, mesh.dp_rank])
            loss.backward()
            plan.finish_gradient_sync()
            rec.losses.append([loss.item()])
            rec.norms.append(plan.clip_grad_norm_(1e9).item())
            rec.grads.append(_snapshot(model))
            opt.step()
        rec.params = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
        rec.agreement_calls = sum(m.agree_stratum.calls for m in model.modules()
                                  if isinstance(m, StratifiedMoELayer) and m.agree_stratum is not None)
        plan.reducer.remove_hooks()
        out.append(rec)
    return out


def _shard(full, local, ep_rank: int):
    rows = local.shape[0]
    return full[ep_rank * rows:(ep_rank + 1) * rows]


def test_arch_ep_parity_dp2_ep2():
    results = run_distributed(_rank_body, 2, CASES, timeout=240)
    for i, name in enumerate(CASES):
        ref = run_reference(name)
        ranks = [per_rank[i] for per_rank in results]
        assert ranks[0].expert_names, f"{name}: nothing was sharded"
        if name.startswith("stratified"):
            calls = [r.agreement_calls for r in ranks]
            assert calls[0] == calls[1] > 0, f"{name}: agreement calls {calls}"
        for rank, rec in enumerate(ranks):
            experts = set(rec.expert_names)
            for step in range(STEPS):
                torch.testing.assert_close(rec.losses[step][0], ref.losses[step][rank], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name} rank {rank} step {step} loss: {m}")
                torch.testing.assert_close(rec.norms[step], ref.norms[step], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name} rank {rank} step {step} grad norm: {m}")
                assert rec.grads[step].keys() == ref.grads[step].keys(), f"{name}: gradient names differ"
                for pname, grad in rec.grads[step].items():
                    want = ref.grads[step][pname]
                    want = _shard(want, grad, rec.ep_rank) if pname in experts else want
                    torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(want), rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{name} rank {rank} step {step} grad {pname}: {m}")
            for pname, param in rec.params.items():
                want = ref.params[pname]
                want = _shard(want, param, rec.ep_rank) if pname in experts else want
                torch.testing.assert_close(torch.from_numpy(param), torch.from_numpy(want), rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name} rank {rank} final {pname}: {m}")
