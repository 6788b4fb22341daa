"""MoA under dp=2 x ep=2 on gloo against its single-process twin.

MoA's attention experts stay replicated (ALGORITHMS.md section 1(f); like SwitchHead's), so
what ep shards is the model's MoE MLPs, here in every block beside MoA attention. Each rank
trains 2 AdamW steps on its own micro-batch of a global batch of 2; the reference trains the
same model in the pytest process on both micro-batches (loss / 2 each). Compared: every
micro-batch loss (MoA's balance and z losses included), the global grad norm, every gradient
(MLP expert shards against the slice of the reference's full tensor) and the final parameters.
"""

from __future__ import annotations

import torch
from harness import run_distributed

from moe_dist.config import ModelConfig, MoEConfig, RouterConfig
from moe_dist.config.model import MoAConfig
from moe_dist.models.registry import build

SEQ, MICRO, STEPS, LR, DP = 8, 2, 2, 1e-2, 2


def build_moa():
    torch.manual_seed(7)
    model = ModelConfig(arch="moa", vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=SEQ,
                        moa=MoAConfig(num_experts=4, top_k=2))
    moe = MoEConfig(num_experts=4, every=1, expert_ffn_dim=8, router=RouterConfig(top_k=2))
    return build(model, moe)


def batches() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 32, (STEPS, DP, MICRO, SEQ + 1), generator=gen)


def micro_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    assert {"moa_aux_loss", "moa_z_loss"} <= set(out.losses)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    return loss + sum(out.losses.values())


def _grads(model) -> dict:
    # numpy, not tensors: torch shares tensor storage between processes through file descriptors
    # that die with the rank.
    return {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters() if p.grad is not None}


def _params(model) -> dict:
    return {n: p.detach().clone().numpy() for n, p in model.named_parameters()}


def run_reference() -> dict:
    model = build_moa()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    rec, data = {"losses": [], "norms": [], "grads": []}, batches()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        losses = []
        for r in range(DP):
            loss = micro_loss(model, data[step, r])
            (loss / DP).backward()
            losses.append(loss.item())
        rec["losses"].append(losses)
        rec["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item())
        rec["grads"].append(_grads(model))
        opt.step()
    rec["params"] = _params(model)
    return rec


def _rank_body(rank: int, world_size: int) -> dict:
    from moe_dist.config import ParallelConfig
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.distributed.param_tags import is_expert_param
    from moe_dist.train.plan import parallelize

    parallel = ParallelConfig(dp=DP, ep=2)
    mesh = build_mesh(parallel, world_size, "cpu")
    model = build_moa()
    plan = parallelize(model, mesh, parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    rec, data = {"losses": [], "norms": [], "grads": [], "ep_rank": mesh.ep_rank}, batches()
    rec["experts"] = [n for n, p in model.named_parameters() if is_expert_param(p)]
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = micro_loss(model, data[step, mesh.dp_rank])
        loss.backward()
        plan.finish_gradient_sync()
        rec["losses"].append(loss.item())
        rec["norms"].append(plan.clip_grad_norm_(1e9).item())
        rec["grads"].append(_grads(model))
        opt.step()
    rec["params"] = _params(model)
    plan.reducer.remove_hooks()
    return rec


def _shard(full: torch.Tensor, local: torch.Tensor, ep_rank: int) -> torch.Tensor:
    rows = local.shape[0]
    return full[ep_rank * rows:(ep_rank + 1) * rows]


def test_moa_with_moe_mlps_ep_parity_dp2_ep2():
    ranks = run_distributed(_rank_body, 2, timeout=240)
    ref = run_reference()
    for rank, rec in enumerate(ranks):
        experts = set(rec["experts"])
        assert experts and all(".mlp." in n for n in experts), f"sharded: {sorted(experts)}"
        assert not any(".attention." in n for n in experts), "MoA attention experts must stay replicated"
        for step in range(STEPS):
            torch.testing.assert_close(rec["losses"][step], ref["losses"][step][rank], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rec["norms"][step], ref["norms"][step], rtol=1e-4, atol=1e-6)
            assert rec["grads"][step].keys() == ref["grads"][step].keys()
            for name, grad in rec["grads"][step].items():
                want = ref["grads"][step][name]
                want = _shard(want, grad, rec["ep_rank"]) if name in experts else want
                torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(want), rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} grad {name}: {m}")
        for name, param in rec["params"].items():
            want = ref["params"][name]
            want = _shard(want, param, rec["ep_rank"]) if name in experts else want
            torch.testing.assert_close(torch.from_numpy(param), torch.from_numpy(want), rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
