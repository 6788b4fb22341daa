"""Causality of every router and architecture: in a causal LM, changing the last token of each
sequence must not move the logits of any earlier position, in training and in eval mode.

Dropless capacity throughout. Documented exceptions: 'expert_choice' (experts pick tokens over
the whole micro-batch), PEER with the paper's BatchNorm query (training statistics mix positions;
checked to leak below), fixed/dynamic capacity (the drop decision is taken over the whole batch,
docs/routing.md). DA-MoE is included: its importance comes from causal attention statistics.
"""

import pytest
import torch

from moe_dist.config import load_config
from moe_dist.models.registry import build_model

BASE = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=40",
        "model.max_seq_len=16", "data.seq_len=16", "moe.num_experts=4", "moe.every=1",
        "moe.expert_ffn_dim=16", "moe.capacity.policy=dropless"]
ROUTERS = {
    "softmax_topk": [],
    "sigmoid_topk": ["moe.router.type=sigmoid_topk"],
    "top_p": ["moe.router.type=top_p", "moe.router.top_k=4"],
    "xmoe": ["moe.router.type=xmoe", "moe.router.top_k=4"],
    "top_any": ["moe.router.type=top_any", "moe.router.top_k=4"],
    "da_moe": ["moe.router.type=da_moe", "moe.router.top_k=4"],
}
ARCHS = {
    "switchhead": ["model.arch=switchhead"],
    "peer_layernorm": ["model.arch=peer", "model.peer.num_experts=64", "model.peer.heads=2", "model.peer.top_k=4",
                       "model.peer.query_dim=8"],
    "mh_moe": ["model.arch=mh_moe"],
    "stratified": ["model.arch=stratified", "model.stratified.strata=[2,2]"],
    "hmoe": ["model.arch=hmoe", "model.hmoe.widths=[8,16,16,24]", "model.hmoe.entropy_coef=0.01"],
    "moa": ["model.arch=moa"],
}


def earlier_logits_shift(overrides: list[str], training: bool) -> float:
    cfg = load_config(None, [*BASE, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    model.train(training)
    tokens = torch.randint(0, 40, (4, 16))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 40
    with torch.no_grad():
        torch.manual_seed(1)  # the same jitter/dropout draws in both passes
        before = model(tokens).logits[:, :-1]
        torch.manual_seed(1)
        after = model(changed).logits[:, :-1]
    return (before - after).abs().max().item()


CASES = list({**ROUTERS, **ARCHS}.items())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, overrides", CASES)
def test_earlier_positions_do_not_see_the_last_token(name, overrides, training):
    assert earlier_logits_shift(overrides, training) < 1e-5


def test_peer_batchnorm_query_is_not_causal_in_training_as_documented():
    batchnorm = [*ARCHS["peer_layernorm"], "model.peer.query_norm=batchnorm"]
    assert earlier_logits_shift(batchnorm, training=True) > 1e-4
    assert earlier_logits_shift(batchnorm, training=False) < 1e-5  # running statistics at eval
