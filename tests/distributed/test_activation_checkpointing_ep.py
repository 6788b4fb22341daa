"""Activation checkpointing under expert parallelism (2 gloo ranks, ep=2): 'full' recomputes each
block in backward, all-to-alls included (also chunked, moe.dispatch_chunks=2); losses, gradients
and statistics must equal the run that keeps every activation, on every rank."""

from __future__ import annotations

from harness import run_distributed

OVERRIDES = ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=32", "model.vocab_size=40",
             "model.max_seq_len=8", "data.seq_len=8", "moe.num_experts=4", "moe.every=1",
             "moe.expert_ffn_dim=8", "moe.router.jitter=0.1", "moe.router.bias_update_rate=0.01",
             "parallel.ep=2"]
CAPACITY = {"dropless": ["moe.capacity.policy=dropless"],
            "fixed": ["moe.capacity.policy=fixed", "moe.capacity.capacity_factor=1.0"],
            # chunked dispatch (split-phase all-to-alls recomputed in backward), a shared expert
            "chunked": ["moe.capacity.policy=dropless", "moe.dispatch_chunks=2", "moe.num_shared_experts=1"]}


def _body(rank: int, world_size: int) -> list[str]:
    import torch

    from moe_dist.config import load_config
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.models.activation_checkpointing import apply_activation_checkpointing
    from moe_dist.models.registry import build_model
    from moe_dist.train.plan import parallelize

    checked = []
    for policy, extra in CAPACITY.items():
        cfg = load_config(None, [*OVERRIDES, *extra])
        mesh = build_mesh(cfg.parallel, world_size, "cpu")
        runs = {}
        for mode in ("none", "full", "selective"):
            torch.manual_seed(0)
            model = build_model(cfg.model, cfg.moe)
            apply_activation_checkpointing(model, mode)
            plan = parallelize(model, mesh, cfg)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            torch.manual_seed(10 + rank)
            losses, grads = [], []
            for _step in range(2):
                optimizer.zero_grad()
                tokens = torch.randint(0, 40, (2, 9))
                out = model(tokens[:, :-1])
                loss = plan.cross_entropy(out.logits, tokens[:, 1:]) + sum(out.losses.values(), torch.zeros(()))
                loss.backward()
                plan.finish_gradient_sync()
                losses.append(loss.detach())
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
                optimizer.step()
                plan.after_optimizer_step(model)
            runs[mode] = (losses, grads, {n: b.clone() for n, b in model.named_buffers()})
        want_losses, want_grads, want_buffers = runs["none"]
        for mode in ("full", "selective"):
            losses, grads, buffers = runs[mode]
            torch.testing.assert_close(torch.stack(losses), torch.stack(want_losses), rtol=0, atol=0)
            for got, want in zip(grads, want_grads):
                for name in want:
                    torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7,
                                               msg=f"{policy} {mode}: {name}")
            for name in want_buffers:
                torch.testing.assert_close(buffers[name], want_buffers[name], rtol=0, atol=0,
                                           msg=f"{policy} {mode}: buffer {name}")
            checked.append(f"{policy}/{mode}")
    return checked


def test_checkpointing_matches_under_expert_parallelism():
    results = run_distributed(_body, 2, timeout=240)
    assert results[0] == results[1] == ["dropless/full", "dropless/selective", "fixed/full", "fixed/selective",
                                        "chunked/full", "chunked/selective"]
