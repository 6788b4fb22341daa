"""train.compile (moe_dist/models/compile.py): compiled blocks train as the eager ones do, with the
same parameter names; the combinations it does not support are config errors."""

import pytest
import torch

from moe_dist.config import ConfigError, load_config, validate
from moe_dist.models.activation_checkpointing import apply_activation_checkpointing
from moe_dist.models.compile import compile_blocks
from moe_dist.models.registry import build_model

BASE = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=50",
        "model.max_seq_len=16", "data.seq_len=8", "moe.num_experts=4", "moe.every=2", "moe.expert_ffn_dim=16"]


def _train(compiled: bool, checkpointing: str, steps: int = 3):
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    names = [name for name, _ in model.named_parameters()]
    if compiled:  # the trainer's order: compile, then recompute
        compile_blocks(model)
    apply_activation_checkpointing(model, checkpointing)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        tokens = torch.randint(0, 50, (2, 9))
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss = loss + sum(out.losses.values(), torch.zeros(()))
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    stats = {name: b.clone() for name, b in model.named_buffers() if "stats" in name}
    return losses, grads, stats


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_compiled_blocks_train_like_eager_blocks(checkpointing):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_grads, eager_stats = _train(False, checkpointing)
    assert not counters["stats"]["unique_graphs"]
    losses, grads, stats = _train(True, checkpointing)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    for name, counts in stats.items():  # routing statistics counted once per step, as in eager
        torch.testing.assert_close(counts, eager_stats[name], msg=name)


def test_compile_is_refused_with_deepspeed_and_with_fsdp():
    with pytest.raises(ConfigError, match="train.compile=true with train.engine=deepspeed"):
        validate(load_config(None, [*BASE, "train.compile=true", "train.engine=deepspeed", "zero.stage=1",
                                    "parallel.dp=2"]), world_size=2)
    with pytest.raises(ConfigError, match="train.compile=true with parallel.fsdp=true"):
        validate(load_config(None, [*BASE, "train.compile=true", "parallel.fsdp=true", "parallel.dp=2"]),
                 world_size=2)


def test_a_model_without_blocks_or_compiled_twice_is_refused():
    with pytest.raises(ValueError, match="needs a model with blocks in '.layers'"):
        compile_blocks(torch.nn.Linear(2, 2))
    cfg = load_config(None, BASE)
    model = compile_blocks(build_model(cfg.model, cfg.moe))
    with pytest.raises(ValueError, match="already compiled"):
        compile_blocks(model)


def test_compiled_code_sees_no_cache_wrapper_in_the_kernel_switch():
    """Every fast-path switch calls triton_available() inside compiled regions; a functools cache
    around it made Dynamo warn ("Dynamo detected a call to a `functools.lru_cache`-wrapped
    function") in every compiled run."""
    import warnings

    from moe_dist.moe.kernels.permute import triton_available

    def switch(x):
        return x + 1 if triton_available() else x - 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(switch, backend="eager")(torch.zeros(2))
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert torch.equal(out, switch(torch.zeros(2)))
