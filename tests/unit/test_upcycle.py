"""``model.init_from``: a dense Hugging Face Llama (made here with transformers, random weights)
or a moe_dist checkpoint initialises a model; copy-upcycling reproduces the dense function at
step 0 and partition-upcycling puts every neuron in exactly one expert.

Tolerance: logits within 1e-5 absolute (fp32; measured max ~1e-7).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_dist.config import ConfigError, load_config
from moe_dist.models.registry import build_model
from moe_dist.models.upcycle import initial_state, partition_neurons, partition_scale
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.init_from import initialize_from
from moe_dist.train.plan import LocalPlan

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
BASE = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
        "model.vocab_size=256", "model.norm_eps=1e-5", "data.seq_len=32", "moe.every=1"]
DENSE = ["moe.num_experts=0"]
COPY = ["moe.num_experts=4", "moe.expert_ffn_dim=64"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers itself (weights spread out so that a wrong
    mapping shows in the logits)."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.3)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))


def init_model(*overrides: str):
    cfg = load_config(None, [*BASE, *overrides])
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.moe)
    initialize_from(model, cfg)
    return cfg, model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(tokens()).logits


def test_a_dense_llama_imports_with_transformers_logits(llama_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    _, dense = init_model(*DENSE, f"model.init_from={llama_dir}")
    with torch.no_grad():
        torch.testing.assert_close(logits(dense), hf(tokens()).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("router", [
    ["moe.router.top_k=2"],                                   # renormalised: the router keeps its random init
    ["moe.router.top_k=1", "moe.num_shared_experts=1"],       # top-1 softmax: zero router, w2 * E
    ["moe.router.type=sigmoid_topk", "moe.router.top_k=2"],   # renormalised sigmoid
    ["moe.router.normalize_weights=false", "moe.router.top_k=3"],
], ids=["softmax-top2", "softmax-top1-shared", "sigmoid-top2", "unnormalised-top3"])
def test_copy_upcycling_computes_the_dense_function(llama_dir, router):
    _, dense = init_model(*DENSE, f"model.init_from={llama_dir}")
    _, moe = init_model(*COPY, *router, f"model.init_from={llama_dir}")
    torch.testing.assert_close(logits(moe), logits(dense), atol=ATOL, rtol=0)
    layer = moe.layers[0].mlp
    assert not torch.equal(layer.experts.w13, torch.zeros_like(layer.experts.w13))
    if router == ["moe.router.top_k=2"]:
        assert layer.router.weight.abs().sum() > 0  # random router: diverse routing from step 0


def test_noise_makes_experts_differ(llama_dir):
    _, moe = init_model(*COPY, "model.upcycle_noise_std=0.01", f"model.init_from={llama_dir}")
    w13 = moe.layers[0].mlp.experts.w13
    assert not torch.equal(w13[0], w13[1])
    assert (w13[0] - w13[1]).std().item() == pytest.approx(0.01 * 2 ** 0.5, rel=0.2)


def test_partition_covers_every_neuron_exactly_once(llama_dir):
    partition = partition_neurons(64, 4, torch.Generator().manual_seed(0))
    assert sorted(partition.flatten().tolist()) == list(range(64))

    cfg, moe = init_model("moe.num_experts=3", "moe.num_shared_experts=1", "moe.expert_ffn_dim=16",
                          "model.upcycle_mode=partition", f"model.init_from={llama_dir}")
    _, dense = init_model(*DENSE, f"model.init_from={llama_dir}")
    for block_moe, block_dense in zip(moe.layers, dense.layers):
        layer, mlp = block_moe.mlp, block_dense.mlp
        gate_rows = torch.cat([layer.experts.w13[:, :, :16].transpose(1, 2).reshape(-1, 32),
                               layer.shared_experts.w1.weight])  # routed experts' neurons, then the shared ones
        assert gate_rows.shape == mlp.w1.weight.shape == (64, 32)
        # each dense neuron's w1 row appears exactly once among the experts' rows, and vice versa
        matches = (mlp.w1.weight[:, None, :] == gate_rows[None, :, :]).all(-1)  # [dense neuron, expert row]
        assert matches.sum(1).tolist() == [1] * 64 and matches.sum(0).tolist() == [1] * 64
        assert layer.router.weight.abs().sum() > 0  # the router keeps its random init
        scale = partition_scale(cfg.moe)
        assert scale == 3.0  # E / (k * 1/k): each selected group counts E/k = 3/2 times with weight 1/2
        up = layer.experts.w13[:, :, 16:].transpose(1, 2).reshape(-1, 32)
        down = layer.experts.w2.reshape(-1, 32) / scale
        for row in range(48):  # a neuron's gate, up and down weights stay together
            neuron = int(matches[:, row].nonzero())
            assert torch.equal(up[row], mlp.w3.weight[neuron])
            torch.testing.assert_close(down[row], mlp.w2.weight[:, neuron], atol=1e-7, rtol=1e-6)
        shared_neurons = matches[:, 48:].float().argmax(0)  # the dense neuron of each shared-expert row
        assert torch.equal(layer.shared_experts.w2.weight, mlp.w2.weight[:, shared_neurons])  # unscaled


def save_checkpoint(run_dir: Path, model, cfg) -> None:
    def write(directory: Path) -> None:
        LocalPlan().save_model_and_optimizer(directory, model, None)
        (directory / "config.yaml").write_text(cfg.to_yaml())

    ckpt.save_checkpoint(run_dir, 1, write, keep_last=1)


def test_init_from_a_moe_dist_checkpoint_copies_and_upcycles(tmp_path, llama_dir):
    cfg, dense = init_model(*DENSE, f"model.init_from={llama_dir}")
    save_checkpoint(tmp_path / "dense", dense, cfg)
    _, moe = init_model(*COPY, f"model.init_from={tmp_path / 'dense'}")  # a run directory: its newest checkpoint
    torch.testing.assert_close(logits(moe), logits(dense), atol=ATOL, rtol=0)

    cfg_moe, source = init_model(*COPY, "model.upcycle_noise_std=0.1", f"model.init_from={llama_dir}")
    save_checkpoint(tmp_path / "moe", source, cfg_moe)
    _, copied = init_model(*COPY, f"model.init_from={tmp_path / 'moe' / 'checkpoints' / 'step_00000001'}")
    for (name, a), b in zip(source.state_dict().items(), copied.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("overrides, message", [
    (["moe.num_experts=4", "moe.expert_ffn_dim=32"], r"moe.expert_ffn_dim \(32\) must equal its width \(64\)"),
    (["moe.num_experts=4", "moe.expert_ffn_dim=32", "model.upcycle_mode=partition"],
     r"must be 64, got \(4 \+ 0\) \* 32; set moe.expert_ffn_dim=16"),
    (["moe.num_experts=0", "model.dim=64"], r"set model.dim=32 \(config has 64\)"),
    (["moe.num_experts=0", "model.norm_eps=1e-6"], r"model.norm_eps=1e-05"),
    (["moe.num_experts=4", "moe.expert_ffn_dim=64", "moe.router.type=expert_choice"], "fixed top-k token-choice"),
])
def test_mismatches_are_config_errors(llama_dir, overrides, message):
    cfg = load_config(None, [*BASE, *overrides, f"model.init_from={llama_dir}"])
    with pytest.raises(ConfigError, match=message):
        initialize_from(build_model(cfg.model, cfg.moe), cfg)


def test_grouped_query_attention_is_refused(tmp_path):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    cfg = load_config(None, [*BASE, *DENSE, f"model.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="grouped-query attention"):
        initialize_from(build_model(cfg.model, cfg.moe), cfg)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not a dense Llama-style model"),
])
def test_llama_features_moe_dist_lacks_are_refused(tmp_path, llama_dir, change, message):
    import json
    import shutil

    shutil.copytree(llama_dir, tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, **change}))
    cfg = load_config(None, [*BASE, *DENSE, f"model.init_from={tmp_path / 'llama'}"])
    with pytest.raises(ConfigError, match=message):
        initialize_from(build_model(cfg.model, cfg.moe), cfg)


def test_a_source_that_does_not_fit_lists_the_tensors(tmp_path, llama_dir):
    cfg, moe = init_model(*COPY, f"model.init_from={llama_dir}")
    save_checkpoint(tmp_path / "moe", moe, cfg)
    target_cfg = load_config(None, [*BASE, *DENSE])
    with pytest.raises(ConfigError, match="layers.0.mlp.w1.weight .* is not in checkpoint"):
        initial_state(build_model(target_cfg.model, target_cfg.moe),
                      {k: v for k, v in moe.state_dict().items()}, target_cfg.moe, source_name="checkpoint x")


def test_a_resuming_run_does_not_read_init_from(tmp_path):
    cfg = load_config(None, [*BASE, *DENSE, f"model.init_from={tmp_path / 'missing'}"])
    model = build_model(cfg.model, cfg.moe)
    with pytest.raises(ConfigError, match="no such directory"):
        initialize_from(model, cfg, tmp_path / "run")
    save_checkpoint(tmp_path / "run", model, cfg)
    initialize_from(model, cfg, tmp_path / "run")  # checkpoint.resume=auto finds step 1: not read
