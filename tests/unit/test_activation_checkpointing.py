"""Activation checkpointing (moe_dist/models/activation_checkpointing.py): with and without
recompute, the same losses, every gradient, the same routing and statistics counted once."""

import contextlib
import copy
from unittest import mock

import pytest
import torch

from moe_dist.config import load_config
from moe_dist.models.activation_checkpointing import apply_activation_checkpointing
from moe_dist.models.registry import build_model
from moe_dist.models.transformer import Attention
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.routing.state import update_selection_bias_from_stats

BASE = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=50",
        "model.max_seq_len=16", "data.seq_len=8", "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=16"]
VARIANTS = {
    "top_k_jitter_bias_fixed": ["moe.router.jitter=0.2", "moe.router.bias_update_rate=0.01",
                                "moe.capacity.policy=fixed", "moe.capacity.capacity_factor=1.0"],
    "top_any_adaptive": ["moe.router.type=top_any", "moe.router.top_k=4", "moe.router.adaptive.enabled=true",
                         "moe.router.adaptive.update_every=2", "moe.router.adaptive.record_steps=0"],
    "xmoe_controller": ["moe.router.type=xmoe", "moe.router.top_k=3", "moe.capacity.policy=controller"],
    # the second expert is drawn from the RNG: recompute must draw the same (checkpoint's RNG replay)
    "stratified_sampling": ["model.arch=stratified", "model.stratified.strata=[2,2]",
                            "model.stratified.second_expert=sampling"],
    "peer": ["model.arch=peer", "model.peer.num_experts=64", "model.peer.heads=2", "model.peer.top_k=4",
             "model.peer.query_dim=8"],
}


def _train(mode: str, overrides: list[str], steps: int = 2):
    cfg = load_config(None, [*BASE, *overrides])
    calls = {"router": 0, "experts": 0}
    torch.manual_seed(0)
    with _counting(GroupedExperts, "experts", calls):  # the recompute calls forward, not __call__
        model = build_model(cfg.model, cfg.moe)
        for module in model.modules():
            if isinstance(module, MoELayer):
                module.router.register_forward_hook(lambda *_: calls.__setitem__("router", calls["router"] + 1))
        apply_activation_checkpointing(model, mode)
        return _steps(model, steps) + (calls,)


@contextlib.contextmanager
def _counting(cls, key, calls):
    original = cls.forward

    def counted(self, *args, **kwargs):
        calls[key] += 1
        return original(self, *args, **kwargs)

    with mock.patch.object(cls, "forward", counted):
        yield


def _steps(model, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        for _micro in range(2):
            tokens = torch.randint(0, 50, (2, 9))
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss = loss + sum(out.losses.values(), torch.zeros(()))
            loss.backward()
            losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        update_selection_bias_from_stats(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return losses, grads, buffers


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_matches_keeping_everything(variant, mode):
    ref_losses, ref_grads, ref_buffers, ref_calls = _train("none", VARIANTS[variant])
    losses, grads, buffers, calls = _train(mode, VARIANTS[variant])
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=0, atol=0)
    for step, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")
    for name in ref_buffers:  # load counters, bias, DynMoE records, controller: counted once
        torch.testing.assert_close(buffers[name], ref_buffers[name], rtol=0, atol=0, msg=name)
    if variant != "peer":  # recompute really ran: full re-routes, selective re-runs the experts only
        assert calls["router"] == ref_calls["router"] * (2 if mode == "full" else 1)
        assert calls["experts"] == ref_calls["experts"] * 2


def test_selective_wraps_attention_and_experts_and_full_wraps_blocks():
    cfg = load_config(None, BASE)
    model = apply_activation_checkpointing(build_model(cfg.model, cfg.moe), "selective")
    wrapped = {type(m) for m in model.modules() if getattr(m, "_recompute", None)}
    assert wrapped == {Attention, GroupedExperts}
    full = apply_activation_checkpointing(build_model(cfg.model, cfg.moe), "full")
    assert all(block._recompute == "full" for block in full.layers)
    names = [n for n, _ in full.named_parameters()]
    assert names == [n for n, _ in build_model(cfg.model, cfg.moe).named_parameters()]  # checkpoints unchanged
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(full, "full")
    with pytest.raises(ValueError, match="must be one of"):
        apply_activation_checkpointing(copy.deepcopy(model), "some")


def test_an_unknown_mode_is_a_config_error():
    from moe_dist.config import ConfigError

    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config(None, ["train.activation_checkpointing=partial"])
