"""Stratified MoE: the strata 4+4 hand trace (ALGORITHMS.md section 12), per-pass capacity and
balance loss, the agreement hook, shapes, gradients and bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import CapacityConfig, ConfigError, ModelConfig, MoEConfig, RouterConfig, StratifiedConfig
from moe_dist.models.registry import build
from moe_dist.models.stratified import StratifiedMoELayer

DIM = 8


def _layer(policy: str = "dropless", strata=(4, 4)) -> StratifiedMoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=sum(strata), expert_ffn_dim=6, grouped_gemm="loop",
                    router=RouterConfig(top_k=2, aux_loss_coef=0.01),
                    capacity=CapacityConfig(policy=policy, capacity_factor=1.0))
    layer = StratifiedMoELayer(DIM, 16, moe, StratifiedConfig(strata=list(strata)), 1e-5)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.05)
        # Token direction e0 picks expert 5 (stratum 2) first; e1 picks expert 1 (stratum 1).
        layer.router.weight[5, 0] = 3.0
        layer.router.weight[1, 1] = 3.0
    return layer


def _expert(layer: StratifiedMoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ layer.experts.w13[e]).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ layer.experts.w2[e]


def _routed(layer, x_hat, weight, offset):
    probs = torch.softmax(x_hat @ weight.t(), -1)
    top = torch.topk(probs, 2).indices
    w = probs[top] / probs[top].sum()
    return sum(w[j] * _expert(layer, int(top[j]) + offset, x_hat) for j in range(2)), int(top[0]) + offset, probs


def test_hand_trace_strata_4_4():
    layer = _layer()
    x = torch.stack([torch.eye(DIM)[0] * 0.7, torch.eye(DIM)[1] * 1.3]).view(1, 2, DIM)
    out, losses = layer(x)

    # Pass 1 (stratum 0, 8-way gate, both tokens).
    x_hat = layer.norms[0](x[0])
    y0, top0, p0 = _routed(layer, x_hat[0], layer.router.weight, 0)
    y1, top1, p1 = _routed(layer, x_hat[1], layer.router.weight, 0)
    assert (top0, top1) == (5, 1)
    # Token 0 chose stratum 2 and is done; token 1 chose stratum 1 and takes pass 2,
    # on a 4-way gate over experts 4..7 fed norm_1(x + pass-1 output).
    z1 = layer.norms[1](x[0, 1] + y1)
    y1b, top1b, p1b = _routed(layer, z1, layer.upper_gates[0].weight, 4)
    assert layer.upper_gates[0].weight.shape == (4, DIM) and top1b >= 4
    torch.testing.assert_close(out[0, 0], y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0, 1], y1 + y1b, rtol=1e-5, atol=1e-6)

    # Per-pass balance loss over the visible experts, averaged over the 2 passes.
    ce1 = torch.zeros(8)
    ce1[5] += 0.5
    ce1[1] += 0.5
    aux1 = 8 * ((p0 + p1) / 2 * ce1).sum()
    aux2 = 4 * (p1b * F.one_hot(torch.tensor(top1b - 4), 4)).sum()
    torch.testing.assert_close(losses["aux_loss"], 0.01 * (aux1 + aux2) / 2)
    # Expert-load stats: 3 token-passes x top-2, tokens counted once.
    assert layer.stats.kept.sum() == 6 and layer.stats.tokens == 2
    assert layer.mean_passes() == 1.5


def test_capacity_of_a_pass_uses_the_visible_experts():
    layer = _layer(policy="fixed")
    layer._visible = 4
    assert layer.capacity_for(9, 2) == 2 * math.ceil(9 / 4)
    layer._visible = 8
    assert layer.capacity_for(9, 2) == 2 * math.ceil(9 / 8)
    x = torch.randn(2, 5, DIM)
    out, _ = layer(x)
    assert out.shape == x.shape and out.isfinite().all()


def test_agreement_hook_sets_the_passes_and_capacity():
    layer = _layer(policy="fixed")
    calls, capacities = [], []
    dispatch = layer.dispatcher.dispatch

    def spy(x, indices, valid):
        capacities.append(layer.capacity_for(x.shape[0], 2))
        return dispatch(x, indices, valid)

    def agree(counts):
        calls.append(counts.tolist())
        # A peer rank holds 10 tokens at stratum 1 until its second pass is done.
        return torch.maximum(counts, torch.tensor([0, 10])) if len(calls) <= 2 else counts

    layer.dispatcher.dispatch = spy
    layer.set_stratum_agreement(agree)
    out, _ = layer(torch.randn(1, 4, DIM))
    assert calls[0] == [4, 0] and calls[-1] == [0, 0]
    # Pass 1: stratum 0 with 4 local tokens; then stratum 1 with the peer's 10 (whatever this
    # rank holds, maybe zero rows) sizing the capacity: 2*ceil(10/4).
    assert capacities[0] == 2 * math.ceil(4 / 8) and capacities[1] == 2 * math.ceil(10 / 4)
    assert len(capacities) == 2 and out.shape == (1, 4, DIM)


def test_model_shapes_grads_and_flops():
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="stratified", vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8,
                            stratified=StratifiedConfig(strata=[2, 2, 4]))
    moe = MoEConfig(num_experts=8, every=2, expert_ffn_dim=8)
    model = build(model_cfg, moe)
    out = model(torch.randint(0, 32, (2, 8)))
    assert out.logits.shape == (2, 8, 32) and "aux_loss" in out.losses
    (out.logits.logsumexp(-1).mean() + out.losses["aux_loss"]).backward()
    layer = model.layers[1].mlp
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts.w13.grad.abs().sum() > 0
    assert 1.0 <= model.mean_passes()[0] <= 3.0
    flops = model.flops_per_token(8)
    passes = model.mean_passes()[0]
    assert flops.experts == pytest.approx(3 * passes * 2 * 6 * 16 * 8)


def test_bad_strata():
    with pytest.raises(ConfigError, match="sum to 6 but moe.num_experts is 8"):
        build(ModelConfig(arch="stratified", vocab_size=8, dim=8, n_heads=2,
                          stratified=StratifiedConfig(strata=[2, 4])), MoEConfig(num_experts=8))
    with pytest.raises(ConfigError, match="positive sizes"):
        StratifiedConfig(strata=[4, 0])


def test_a_model_on_the_meta_device_counts_one_pass_per_token():
    """Dry runs and reports build models on the meta device: the FLOP count must not read the
    (meta) pass counters, and counts one pass per token as before training."""
    from moe_dist.config import load_config
    from moe_dist.metrics.flops import training_flops_per_token
    from moe_dist.models.registry import build_model

    cfg = load_config("configs/stratified.yaml", ["model.dim=32", "model.n_layers=2", "model.n_heads=4",
                                                  "model.ffn_dim=64", "model.vocab_size=64", "data.seq_len=16"])
    with torch.device("meta"):
        meta_model = build_model(cfg.model, cfg.moe)
    cpu_model = build_model(cfg.model, cfg.moe)
    assert meta_model.mean_passes() and all(p == 1.0 for p in meta_model.mean_passes())
    meta = training_flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len, model=meta_model).total
    assert meta == training_flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len, model=cpu_model).total


def test_gumbel_second_expert_samples_the_others_by_their_softmax():
    """The reference's 'sampling' policy: the first expert is the argmax; the second is drawn
    from softmax over the remaining logits (Gumbel-max trick), never the first."""
    from moe_dist.models.stratified import gumbel_second_expert

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, 1.0, math.log(3.0)]).expand(40000, 4)
    picks = gumbel_second_expert(logits)
    assert (picks[:, 0] == 0).all() and (picks[:, 1] != 0).all()
    # P(second = j) = exp(l_j) / (e^0 + e^1 + 3) over j in {1, 2, 3}
    expected = torch.tensor([1.0, math.e, 3.0]) / (4.0 + math.e)
    observed = torch.bincount(picks[:, 1], minlength=4)[1:].double() / len(picks)
    assert torch.allclose(observed, expected.double(), atol=0.01), (observed, expected)


def test_sampling_changes_only_the_second_expert_in_training():
    """second_expert=sampling: the first pass (every token, the same input) picks the same first
    experts as top2, so the same tokens move on; evaluation is the deterministic top-2. (Later
    passes see inputs that include the sampled experts' outputs, so their choices may differ.)"""
    torch.manual_seed(1)
    x = torch.randn(2, 64, DIM)
    outputs, states = {}, {}
    for policy in ("top2", "sampling"):
        layer = _layer()
        layer.second_expert = policy
        seen = []
        one_pass = layer._pass
        layer._pass = lambda inp, stratum: seen.append(r := one_pass(inp, stratum)) or r
        torch.manual_seed(2)
        layer.train()(x)
        states[policy] = seen[0][1]  # the first pass's top-1 expert per token
        layer._pass = one_pass
        outputs[policy] = layer.eval()(x)[0]
    assert torch.equal(states["top2"], states["sampling"])
    assert torch.equal(outputs["top2"], outputs["sampling"])  # eval: deterministic top-2 in both


def test_sampling_routes_some_second_choices_away_from_top2():
    layer = _layer()
    layer.second_expert = "sampling"
    torch.manual_seed(3)
    inp = torch.randn(512, DIM)
    layer.train()
    _, local_idx_top2 = torch.topk(torch.softmax(inp @ layer.router.weight.t(), -1), 2)
    routed = []
    layer.dispatcher.dispatch = (lambda dispatch: lambda x, idx, valid: routed.append(idx) or
                                 dispatch(x, idx, valid))(layer.dispatcher.dispatch)
    layer._pass(inp, 0)
    (indices,) = routed
    assert torch.equal(indices[:, 0], local_idx_top2[:, 0])
    assert (indices[:, 1] != local_idx_top2[:, 1]).any() and (indices[:, 1] != indices[:, 0]).all()


def test_sampling_needs_top2():
    from moe_dist.config import load_config

    with pytest.raises(ConfigError, match=r"second_expert=sampling .* moe.router.top_k is 1; set moe.router.top_k=2"):
        load_config("configs/stratified.yaml", ["model.stratified.second_expert=sampling", "moe.router.top_k=1"])
    cfg = load_config("configs/stratified.yaml", ["model.stratified.second_expert=sampling"])
    assert cfg.model.stratified.second_expert == "sampling"
