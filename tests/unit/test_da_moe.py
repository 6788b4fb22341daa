"""DA-MoE from the block's own attention (moe_dist/moe/routing/variable_k.py causal_importance):
causal by construction, handed from each block's attention to its router, and a real spread of K
after training on the default corpus."""

import pytest
import torch

from moe_dist.config import load_config
from moe_dist.models.registry import build_model
from moe_dist.moe.routing.variable_k import DAMoERouter, causal_importance, causal_percentile

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.max_seq_len=32",
        "data.seq_len=32", "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=16",
        "moe.router.type=da_moe", "moe.router.top_k=4"]


def test_percentile_by_hand():
    values = torch.tensor([[2.0, 1.0, 3.0, 3.0, 0.5]])
    # j=0: 1/1; j=1: {1} of {2,1} -> 1/2; j=2: 3/3; j=3: 4/4 (tie counts); j=4: 1/5
    torch.testing.assert_close(causal_percentile(values), torch.tensor([[1.0, 0.5, 1.0, 1.0, 0.2]]))


def test_uniform_attention_gives_every_token_the_same_importance():
    q = torch.zeros(2, 3, 16, 8)  # zero scores: uniform causal attention
    torch.testing.assert_close(causal_importance(q, torch.randn(2, 3, 16, 8), chunk=5), torch.ones(2, 16))


def test_a_later_token_never_changes_an_earlier_importance():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 40, 8), torch.randn(2, 4, 40, 8)
    before = causal_importance(q, k, chunk=16)
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 30:], k2[:, :, 30:] = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    after = causal_importance(q2, k2, chunk=16)
    assert torch.equal(before[:, :30], after[:, :30]) and not torch.equal(before[:, 30:], after[:, 30:])


def test_the_router_gets_its_own_blocks_attention():
    cfg = load_config(None, [*TINY, "model.vocab_size=50"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    seen, expected = {}, {}
    for i, block in enumerate(model.layers):
        router = block.mlp.router
        assert isinstance(router, DAMoERouter)
        router.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, kwargs["importance_T"]),
                                         with_kwargs=True)

        def keep_qk(module, args, kwargs, output, i=i):  # recompute q, k as the attention did
            from moe_dist.models.transformer import apply_rotary

            x, cos, sin = args
            b, s, _ = x.shape
            q, k = (proj(x).view(b, s, -1, module.head_dim).transpose(1, 2) for proj in (module.wq, module.wk))
            expected[i] = causal_importance(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)).reshape(-1)

        block.attention.register_forward_hook(keep_qk, with_kwargs=True)
    model(torch.randint(0, 50, (3, 32)))
    for i in (0, 1):
        torch.testing.assert_close(seen[i], expected[i])
    assert not torch.equal(seen[0], seen[1])  # each block its own attention


@pytest.mark.slow
def test_after_training_on_the_default_corpus_no_single_k_dominates():
    from moe_dist.data import build_datasets

    cfg = load_config(None, [*TINY, "data.max_documents=20"])
    data = build_datasets(cfg.data)
    cfg.model.vocab_size = data.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = data.train.get(torch.randint(0, len(data.train), (8,), generator=generator))
        out = model(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), rows[:, 1:].flatten())
        (loss + sum(out.losses.values())).backward()
        optimizer.step()
        optimizer.zero_grad()
    for block in model.layers:
        block.mlp.router.k_hist.zero_()
    with torch.no_grad():
        model(data.val.get(torch.arange(min(16, len(data.val))))[:, :-1])
    for block in model.layers:
        hist = block.mlp.router.k_hist[1:]  # bins K = 1..Kmax
        share = hist / hist.sum()
        assert share.max() <= 0.9, f"layer {block.layer_idx}: K distribution {share.tolist()}"
        assert (share > 0).sum() >= 3, share.tolist()


def test_da_moe_with_tensor_parallelism_is_refused_before_any_group():
    from moe_dist.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"da_moe.*parallel.tp \(2\)"):
        validate(load_config(None, [*TINY, "parallel.tp=2"]), 2)
