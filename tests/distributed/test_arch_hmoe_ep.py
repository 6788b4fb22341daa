"""HMoE under dp=2 x ep=2 on gloo against its single-process twin (the pattern of
test_arch_ep.py): losses, grad norms, every gradient and the final parameters. The experts are
placed by width (widths [8, 8, 16, 32]: rank 0 owns expert 3, rank 1 experts 0-2), so each rank
holds a subset of the reference's per-expert parameters under the same names.

Checkpoints: a single-process checkpoint loads at ep=2 (each rank reads the experts it owns,
weights and AdamW slots) and an ep=2 checkpoint loads in one process (every expert, from the
rank that wrote it): the saved layout does not depend on ep."""

from __future__ import annotations

import torch
from harness import run_distributed
from test_arch_ep import DP, LR, STEPS, Record, _snapshot, batches, micro_loss

from moe_dist.config import ModelConfig, MoEConfig, RouterConfig
from moe_dist.config.model import HMoEConfig
from moe_dist.models.registry import build

WIDTHS = [8, 8, 16, 32]


def build_hmoe(gemm: str = "by_width"):
    torch.manual_seed(7)
    model = ModelConfig(arch="hmoe", vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8,
                        hmoe=HMoEConfig(widths=WIDTHS, gemm=gemm, balance_coef=0.01, entropy_coef=0.01))
    return build(model, MoEConfig(num_experts=4, every=1, expert_ffn_dim=16, router=RouterConfig(top_k=2)))


def run_reference() -> Record:
    model = build_hmoe()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    rec, data = Record(), batches()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
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


def _rank_body(rank: int, world_size: int) -> Record:
    from moe_dist.config import ParallelConfig
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.distributed.param_tags import is_expert_param
    from moe_dist.train.plan import parallelize

    parallel = ParallelConfig(dp=DP, ep=2)
    mesh = build_mesh(parallel, world_size, "cpu")
    model = build_hmoe()
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
    plan.reducer.remove_hooks()
    return rec


def test_hmoe_ep_parity_dp2_ep2():
    ranks = run_distributed(_rank_body, 2, timeout=240)
    ref = run_reference()
    owned = [{n.split(".experts.")[1].split(".")[0] for n in r.expert_names} for r in ranks]
    assert owned == [{"3"}, {"0", "1", "2"}], owned  # placed by width: 32 vs 8+8+16
    for rank, rec in enumerate(ranks):
        for step in range(STEPS):
            torch.testing.assert_close(rec.losses[step][0], ref.losses[step][rank], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rec.norms[step], ref.norms[step], rtol=1e-4, atol=1e-6)
            assert set(rec.grads[step]) <= set(ref.grads[step])
            for pname, grad in rec.grads[step].items():
                torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(ref.grads[step][pname]),
                                           rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {pname}: {m}")
        for pname, param in rec.params.items():
            torch.testing.assert_close(torch.from_numpy(param), torch.from_numpy(ref.params[pname]),
                                       rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} final {pname}: {m}")
    # every reference parameter lives on some rank
    assert set(ref.params) == set(ranks[0].params) | set(ranks[1].params)


def _train(model, mesh, plan, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    data = batches()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        micro_loss(model, data[step, mesh.dp_rank]).backward()
        plan.finish_gradient_sync()
        opt.step()
    return opt


def _ckpt_body(rank: int, world_size: int, root: str) -> dict:
    from pathlib import Path

    from moe_dist.config import ParallelConfig
    from moe_dist.distributed.checkpoint import load_model_and_optimizer, save_model_and_optimizer
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.plan import parallelize

    parallel = ParallelConfig(dp=DP, ep=2)
    mesh = build_mesh(parallel, world_size, "cpu")
    # (1) train one step at ep=2 and save
    model = build_hmoe()
    plan = parallelize(model, mesh, parallel)
    opt = _train(model, mesh, plan, 1)
    save_model_and_optimizer(Path(root) / "ep2", model, opt, mesh)
    plan.reducer.remove_hooks()
    # (2) load the single-process checkpoint at ep=2
    fresh = build_hmoe()
    fresh_plan = parallelize(fresh, mesh, parallel)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR, foreach=False)
    load_model_and_optimizer(Path(root) / "ep1", fresh, fresh_opt, mesh)
    fresh_plan.reducer.remove_hooks()
    return {"saved": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
            "loaded": {n: p.detach().numpy().copy() for n, p in fresh.named_parameters()},
            "loaded_exp_avg": {n: fresh_opt.state[p]["exp_avg"].numpy().copy() for n, p in fresh.named_parameters()}}


def test_hmoe_checkpoint_layout_is_independent_of_ep(tmp_path):
    from moe_dist.distributed.checkpoint import load_model_and_optimizer, save_model_and_optimizer
    from moe_dist.distributed.mesh import ParallelMesh

    # A single-process checkpoint after one step on micro-batch 0 (ranks load it at ep=2).
    single = build_hmoe()
    opt = torch.optim.AdamW(single.parameters(), lr=LR, foreach=False)
    opt.zero_grad()
    micro_loss(single, batches()[0, 0]).backward()
    opt.step()
    save_model_and_optimizer(tmp_path / "ep1", single, opt, ParallelMesh.single())
    ranks = run_distributed(_ckpt_body, 2, str(tmp_path), timeout=240)
    params = dict(single.named_parameters())
    for rec in ranks:  # every rank holds a subset of the single-process names, same values
        for name, value in rec["loaded"].items():
            torch.testing.assert_close(torch.from_numpy(value), params[name].detach())
            torch.testing.assert_close(torch.from_numpy(rec["loaded_exp_avg"][name]), opt.state[params[name]]["exp_avg"])
    # The ep=2 checkpoint loads in one process: every expert, from whichever rank wrote it.
    whole = build_hmoe()
    load_model_and_optimizer(tmp_path / "ep2", whole, None, ParallelMesh.single())
    saved = {**ranks[0]["saved"], **ranks[1]["saved"]}
    assert set(saved) == {n for n, _ in whole.named_parameters()}
    for name, param in whole.named_parameters():
        torch.testing.assert_close(param.detach(), torch.from_numpy(saved[name]), msg=lambda m: f"{name}: {m}")
