"""``moe-dist export``: native checkpoints (saved through the plan, as the trainer saves them) load
in ``transformers`` as Mixtral, Qwen2-MoE or Llama, with the same logits and the same greedy
tokens; the tokenizer encodes as moe_dist's; what has no counterpart is refused.

Tolerance: logits within 1e-5 absolute (fp32, CPU; measured max 1.2e-7 on these models). The only
arithmetic differences are RoPE's cos/sin (fp64-then-fp32 here, fp32 in transformers) and the
order of the expert sums.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_dist.cli import main
from moe_dist.config import ConfigError, load_config
from moe_dist.data.tokenizer import ByteTokenizer, train_bpe
from moe_dist.interop.export import export_checkpoint
from moe_dist.models.hf_format import half_split_to_interleaved, interleaved_to_half_split
from moe_dist.models.registry import build_model
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.plan import LocalPlan

transformers = pytest.importorskip("transformers")

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
        "model.vocab_size=256", "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32", "data.seq_len=32"]
ATOL = 1e-5


def save_native_checkpoint(run_dir: Path, *overrides: str):
    """A step-1 checkpoint of a random model written as the native trainer writes it (DCP through
    the plan, config.yaml, manifest). Norm weights and routers are spread out so that a wrong
    mapping shows and no top-k choice is a near tie."""
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
            elif name.endswith("router.weight"):
                param.normal_(0.0, 1.0)
            elif name.endswith(("tok_embeddings.weight", "output.weight")):
                param.normal_(0.0, 1.0)

    def write(directory: Path) -> None:
        LocalPlan().save_model_and_optimizer(directory, model, None)
        (directory / "config.yaml").write_text(cfg.to_yaml())

    ckpt.save_checkpoint(run_dir, 1, write, keep_last=1)
    return cfg, model.eval()


def tokens(batch: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def load_hf(out_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()


@pytest.mark.parametrize("overrides, architecture", [
    ((), "MixtralForCausalLM"),
    (("moe.num_shared_experts=1", "moe.every=2"), "Qwen2MoeForCausalLM"),
    (("moe.router.top_k=1",), "Qwen2MoeForCausalLM"),
    (("moe.num_experts=0", "model.tie_embeddings=true"), "LlamaForCausalLM"),
], ids=["mixtral", "qwen2moe-shared-every2", "qwen2moe-top1", "llama-tied"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, overrides, architecture):
    cfg, model = save_native_checkpoint(tmp_path / "run", *overrides)
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == architecture
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, model(tokens()).logits, atol=ATOL, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rms_norm_eps"] == cfg.model.norm_eps and config["tie_word_embeddings"] == cfg.model.tie_embeddings
    assert config["dtype"] == "float32"  # as the native engine stores it
    if architecture == "Qwen2MoeForCausalLM":
        assert config["decoder_sparse_step"] == cfg.moe.every
        assert config["norm_topk_prob"] is (cfg.moe.router.top_k > 1)


def test_shared_expert_gate_is_zero_and_down_proj_doubled(tmp_path):
    """sigmoid(0) = 1/2 exactly, so the shared expert's down_proj is written doubled."""
    from safetensors.torch import load_file

    _, model = save_native_checkpoint(tmp_path / "run", "moe.num_shared_experts=1")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(tensors["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros(1, 32))
    shared = model.layers[0].mlp.shared_experts
    assert torch.equal(tensors["model.layers.0.mlp.shared_expert.down_proj.weight"], 2 * shared.w2.weight)


def test_rope_permutation_is_exact_and_invertible():
    weight = torch.randn(4 * 8, 5)
    half = interleaved_to_half_split(weight, n_heads=4)
    assert torch.equal(half_split_to_interleaved(half, n_heads=4), weight)
    # head 1's rows: interleaved pairs (0,1),(2,3),.. become halves [0,2,4,6 | 1,3,5,7]
    assert torch.equal(half[8:16], weight[[8, 10, 12, 14, 9, 11, 13, 15]])


def test_cli_export_generates_and_tokenizes_like_moe_dist(tmp_path):
    _, model = save_native_checkpoint(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "moe_dist_export.json"} <= names
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hé said: «naïve» ☃ \x00 end"
    assert tokenizer.encode(text) == ByteTokenizer().encode(text)
    assert tokenizer.decode(ByteTokenizer().encode(text)) == text

    hf = load_hf(tmp_path / "hf")
    prompt = torch.tensor([tokenizer.encode("To be, or")])
    generated = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    expected = prompt
    with torch.no_grad():  # moe_dist's own greedy decoding, recomputing the whole prefix each step
        for _ in range(6):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == expected.tolist()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2  # refuses to overwrite


def test_bpe_tokenizer_and_sharded_bfloat16_weights(tmp_path):
    texts = ["Shall I compare thee to a summer's day? Thou art more lovely and more temperate."] * 8
    bpe = tmp_path / "bpe.json"
    bpe.write_text(train_bpe(iter([texts]), 300))
    cfg, model = save_native_checkpoint(tmp_path / "run", "data.tokenizer=bpe", "data.bpe_vocab_size=300")
    export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="bfloat16", tokenizer_file=bpe,
                      max_shard_bytes=40_000)
    from moe_dist.data.tokenizer import BPETokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode(texts[0]) == BPETokenizer(bpe).encode(texts[0])
    assert tokenizer.eos_token_id == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    assert hf.dtype == torch.bfloat16
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(param.to(torch.bfloat16).float())  # the same rounding as the export
        got, want = hf(tokens()).logits.float(), model(tokens()).logits
    # bf16 arithmetic in transformers vs fp32 here on the same rounded weights: measured 0.09 on
    # logits up to 26 (0.4%); allowed 1% of the largest logit
    assert (got - want).abs().max() <= 0.01 * want.abs().max()


@pytest.mark.parametrize("overrides, message", [
    (("model.arch=peer", "model.peer.num_experts=16", "model.peer.top_k=2", "model.peer.query_dim=8"),
     "cannot export model.arch='peer'"),
    (("moe.router.type=expert_choice",), "only 'softmax_topk' maps exactly"),
    (("moe.router.bias_update_rate=0.001",), "selection bias"),
])
def test_models_without_a_counterpart_are_refused(tmp_path, overrides, message):
    save_native_checkpoint(tmp_path / "run", *overrides)
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_dropping_capacity_policy_warns(tmp_path, caplog):
    save_native_checkpoint(tmp_path / "run", "moe.capacity.policy=fixed")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert "never drops" in caplog.text


def test_not_a_checkpoint_is_a_config_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "hf")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
