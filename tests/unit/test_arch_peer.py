"""PEER: product-key retrieval equals brute force, the layer math by hand, a 1024^2 pool without
N-sized activations, shapes, gradients, FLOPs and bad configs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_dist.config import ConfigError, ModelConfig, MoEConfig, PEERConfig
from moe_dist.models.peer import PEERLayer, product_key_topk
from moe_dist.models.registry import build


def test_product_keys_equal_brute_force_topk():
    gen = torch.Generator().manual_seed(0)
    n, top_k, half = 32, 8, 6
    q1, q2 = torch.randn(50, half, generator=gen), torch.randn(50, half, generator=gen)
    keys1, keys2 = torch.randn(n, half, generator=gen), torch.randn(n, half, generator=gen)
    scores, ids = product_key_topk(q1, q2, keys1, keys2, top_k)
    # All n^2 experts: expert a*n+b scores q1.keys1[a] + q2.keys2[b].
    full = ((q1 @ keys1.t()).unsqueeze(-1) + (q2 @ keys2.t()).unsqueeze(-2)).flatten(-2)  # [50, n*n]
    want_scores, want_ids = torch.topk(full, top_k, dim=-1)
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(ids, want_ids)


def _layer(**peer) -> PEERLayer:
    torch.manual_seed(0)
    cfg = dict(num_experts=16 * 16, heads=2, top_k=3, query_dim=8, query_norm="layernorm", activation="relu")
    cfg.update(peer)
    return PEERLayer(12, PEERConfig(**cfg))


def test_layer_output_by_hand():
    layer = _layer()
    x = torch.randn(1, 5, 12)
    out, losses = layer(x)
    assert losses == {}
    scores, ids = layer.retrieve(x.view(5, 12))
    for t in range(5):
        want = torch.zeros(12)
        for h in range(2):
            g = torch.softmax(scores[t, h], -1)
            for j in range(3):
                e = ids[t, h, j]
                want += g[j] * torch.relu(layer.down.weight[e] @ x[0, t]) * layer.up.weight[e]
        torch.testing.assert_close(out[0, t], want, rtol=1e-5, atol=1e-6)


def test_top1_is_an_h_neuron_mlp_with_unit_gates():
    layer = _layer(top_k=1, heads=3)
    x = torch.randn(4, 12)
    out, _ = layer(x.unsqueeze(0))
    _, ids = layer.retrieve(x)
    u, v = layer.down.weight[ids[:, :, 0]], layer.up.weight[ids[:, :, 0]]  # [T, H, D]
    want = (torch.relu((u * x.unsqueeze(1)).sum(-1)).unsqueeze(-1) * v).sum(1)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_million_expert_pool_without_n_sized_activations():
    torch.manual_seed(0)
    n_experts, dim = 1024 * 1024, 8
    layer = PEERLayer(dim, PEERConfig(num_experts=n_experts, heads=2, top_k=4, query_dim=8))
    x = torch.randn(2, 8, dim, requires_grad=True)
    with _LargestTensor() as probe:
        out, _ = layer(x)
    assert out.shape == (2, 8, dim)
    # The largest activation is the sub-key score table [T, h, sqrt(N)], not anything N-sized.
    assert probe.largest <= 16 * 2 * 1024, f"forward built a tensor of {probe.largest} elements"
    out.square().sum().backward()
    grad_rows = (layer.down.weight.grad.abs().sum(-1) > 0).sum().item()
    assert 0 < grad_rows <= 16 * 2 * 4, "only the retrieved down rows get a gradient"
    assert layer.stats.kept.sum() == 16 * 2 * 4


def test_model_shapes_grads_stats_and_batchnorm():
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="peer", vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8,
                            peer=PEERConfig(num_experts=64, heads=2, top_k=4, query_dim=8, query_norm="batchnorm"))
    model = build(model_cfg, MoEConfig(num_experts=4, every=2))
    assert isinstance(model.layers[1].mlp, PEERLayer) and not isinstance(model.layers[0].mlp, PEERLayer)
    out = model(torch.randint(0, 32, (3, 8)))
    assert out.logits.shape == (3, 8, 32) and out.losses == {}
    out.logits.logsumexp(-1).mean().backward()
    layer = model.layers[1].mlp
    for p in (layer.query.weight, layer.sub_keys, layer.down.weight, layer.up.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.query_norm.running_mean.abs().sum() > 0  # BatchNorm saw the batch
    assert layer.stats.tokens == 24 and layer.stats.kept.shape == (8,)
    model.eval()
    assert model(torch.randint(0, 32, (1, 8))).logits.isfinite().all()


def test_flops_by_hand():
    model_cfg = ModelConfig(arch="peer", vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=8,
                            peer=PEERConfig(num_experts=64, heads=2, top_k=4, query_dim=8))
    model = build(model_cfg, MoEConfig(num_experts=4, every=2))
    got = model.flops_per_token(8)
    assert got.router == 3 * (2 * 16 * 2 * 8 + 2 * 2 * 8 * 8)
    assert got.experts == 3 * (2 * 4 * 4 * 16)
    assert got.dense == 3 * 2 * 3 * 16 * model_cfg.ffn_dim  # block 0 stays a dense SwiGLU


def test_bad_pool_configs():
    with pytest.raises(ConfigError, match="perfect square"):
        PEERConfig(num_experts=1000)
    with pytest.raises(ConfigError, match=r"sqrt\(num_experts\)=8"):
        PEERConfig(num_experts=64, top_k=9)
    with pytest.raises(ConfigError, match="moe.every"):
        build(ModelConfig(arch="peer", vocab_size=8, dim=8, n_heads=2, peer=PEERConfig(num_experts=16, top_k=2)),
              MoEConfig(num_experts=0))
