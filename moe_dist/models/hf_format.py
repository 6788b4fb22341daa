"""Weights and config between moe_dist's :class:`~moe_dist.models.transformer.Transformer` and
Hugging Face causal LMs (Llama, Mixtral, Qwen2-MoE), as plain ``name -> tensor`` dicts.

Pure functions: no file access, no ``transformers`` import (the files are written and read by
``moe_dist/interop/export.py`` and ``moe_dist/train/init_from.py``). Checked against the
modeling code of transformers 5.23 (docs/interop.md lists every convention and its test):

1. **RoPE pairing.** moe_dist rotates interleaved pairs ``(x[2i], x[2i+1])`` of a head
   (``apply_rotary``); Llama/Mixtral/Qwen2 rotate ``(x[i], x[i + d/2])`` (``rotate_half``), with
   the same frequency ``theta^(-2i/d)`` for pair i. A query-key dot product does not change
   when both are permuted alike, so the rows of ``wq`` and ``wk`` are permuted within each head
   (:func:`interleaved_to_half_split`): an exact relabelling, no arithmetic.
2. **Router.** fp32 softmax over ``x @ W_r^T``, top-k, then the selected weights renormalised
   when ``moe.router.normalize_weights`` and ``top_k > 1`` (moe_dist does not renormalise top-1).
   Mixtral always renormalises; Qwen2-MoE renormalises iff ``norm_topk_prob``.
3. **Experts.** ``w13[e]`` is ``[D, 2F]`` with the gate (w1) columns first, ``w2[e]`` is
   ``[F, D]``; HF keeps per-expert ``nn.Linear`` weights ``w1/w3: [F, D]``, ``w2: [D, F]``.
4. **Shared experts.** moe_dist adds them ungated; Qwen2-MoE multiplies the shared expert by
   ``sigmoid(x @ g)`` with no bias, which can never be exactly 1. With ``g = 0`` it is exactly
   1/2, so the shared ``down_proj`` is written doubled (a power-of-two scaling, exact in floating
   point barring overflow): ``sigmoid(0) * (2 * w2) h == w2 h``.
5. **No biases, RMSNorm eps, tied embeddings**: copied as is (``attention_bias``/``qkv_bias``
   false, ``rms_norm_eps = model.norm_eps``, ``tie_word_embeddings = model.tie_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_dist.config import ConfigError, ModelConfig, MoEConfig

NO_COUNTERPART = ("switchhead", "peer", "mh_moe", "stratified", "moa", "hmoe")


@dataclass(frozen=True)
class HFTarget:
    """The Hugging Face class a model exports to and its ``config.json``."""

    architecture: str
    """'LlamaForCausalLM', 'MixtralForCausalLM' or 'Qwen2MoeForCausalLM'."""
    config: dict[str, Any]


# --------------------------------------------------------------------------------------------
# RoPE pairing
# --------------------------------------------------------------------------------------------

def _half_split_order(head_dim: int) -> torch.Tensor:
    """Row ``j`` of a half-split head is row ``order[j]`` of an interleaved one."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``wq``/``wk`` rows from moe_dist's interleaved RoPE pairs to HF's half-split pairs."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim, cols)[:, _half_split_order(head_dim)].reshape(rows, cols)


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half_split`."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    inverse = torch.argsort(_half_split_order(head_dim))
    return weight.reshape(n_heads, head_dim, cols)[:, inverse].reshape(rows, cols)


# --------------------------------------------------------------------------------------------
# Export: moe_dist -> HF
# --------------------------------------------------------------------------------------------

def renormalises_top_k(moe: MoEConfig) -> bool:
    """Whether moe_dist's combine weights are the renormalised top-k softmax (Mixtral's rule)."""
    return moe.router.normalize_weights and moe.router.top_k > 1


def export_target(model: ModelConfig, moe: MoEConfig) -> HFTarget:
    """The HF class and config.json for this model, or a ConfigError saying why there is none."""
    if model.arch in NO_COUNTERPART:
        raise ConfigError(f"cannot export model.arch={model.arch!r}: transformers has no model with its layers "
                          "(SwitchHead attention experts, PEER product-key experts, MH-MoE sub-tokens, "
                          "Stratified MoE, MoA attention experts and HMoE's experts of different widths have no "
                          "counterpart); only "
                          "model.arch=transformer exports")
    if model.vocab_size <= 0:
        raise ConfigError("cannot export: model.vocab_size is unresolved (0) in the checkpoint's config")
    common = {
        "vocab_size": model.vocab_size, "hidden_size": model.dim, "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads, "num_key_value_heads": model.n_heads, "head_dim": model.head_dim,
        "hidden_act": "silu", "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "initializer_range": model.init_std, "tie_word_embeddings": model.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0,
    }
    if not moe.enabled:
        return HFTarget("LlamaForCausalLM", {
            **common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "intermediate_size": model.ffn_dim, "attention_bias": False, "mlp_bias": False})
    _check_router(moe)
    expert_ffn = moe.expert_ffn_dim or model.ffn_dim
    moe_keys = {"num_experts_per_tok": moe.router.top_k, "output_router_logits": False,
                "router_aux_loss_coef": moe.router.aux_loss_coef}
    if moe.num_shared_experts == 0 and moe.every == 1 and renormalises_top_k(moe):
        return HFTarget("MixtralForCausalLM", {
            **common, **moe_keys, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": expert_ffn, "num_local_experts": moe.num_experts, "sliding_window": None,
            "router_jitter_noise": 0.0})
    return HFTarget("Qwen2MoeForCausalLM", {
        **common, **moe_keys, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "intermediate_size": model.ffn_dim, "moe_intermediate_size": expert_ffn, "num_experts": moe.num_experts,
        "shared_expert_intermediate_size": expert_ffn * moe.num_shared_experts,
        "norm_topk_prob": renormalises_top_k(moe), "decoder_sparse_step": moe.every, "mlp_only_layers": [],
        "qkv_bias": False, "use_sliding_window": False, "sliding_window": None})


def _check_router(moe: MoEConfig) -> None:
    router = moe.router
    if router.type != "softmax_topk":
        raise ConfigError(f"cannot export moe.router.type={router.type!r}: Mixtral and Qwen2-MoE route with a "
                          "softmax over all experts followed by a fixed top-k; only 'softmax_topk' maps exactly")
    if router.bias_update_rate > 0:
        raise ConfigError(f"cannot export moe.router.bias_update_rate={router.bias_update_rate}: the learned "
                          "selection bias (auxiliary-loss-free balancing) changes which experts are picked, and "
                          "neither Mixtral nor Qwen2-MoE has such a bias")


def to_hf_state(state: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig,
                target: HFTarget) -> dict[str, torch.Tensor]:
    """moe_dist's single-process state dict -> the HF checkpoint's tensors (legacy per-expert
    names, as the Hub's Mixtral and Qwen1.5-MoE checkpoints store them; transformers 5 fuses
    the experts when it loads them)."""
    heads = model.n_heads
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    mixtral = target.architecture == "MixtralForCausalLM"
    for i in range(model.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "mlp_norm.weight"]
        attn = dst + "self_attn."
        out[attn + "q_proj.weight"] = interleaved_to_half_split(state[src + "attention.wq.weight"], heads)
        out[attn + "k_proj.weight"] = interleaved_to_half_split(state[src + "attention.wk.weight"], heads)
        out[attn + "v_proj.weight"] = state[src + "attention.wv.weight"]
        out[attn + "o_proj.weight"] = state[src + "attention.wo.weight"]
        if not moe.is_moe_layer(i):
            out.update(_dense_mlp(state, src + "mlp.", dst + "mlp."))
            continue
        if src + "mlp.router.expert_bias" in state and bool(state[src + "mlp.router.expert_bias"].any()):
            raise ConfigError(f"cannot export: layer {i}'s router has a non-zero selection bias, which neither "
                              "Mixtral nor Qwen2-MoE has")
        block = dst + ("block_sparse_moe." if mixtral else "mlp.")
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        out[block + "gate.weight"] = state[src + "mlp.router.weight"]
        w13, w2 = state[src + "mlp.experts.w13"], state[src + "mlp.experts.w2"]
        ffn = w2.shape[1]
        for e in range(w13.shape[0]):
            expert = f"{block}experts.{e}."
            out[expert + names[0] + ".weight"] = w13[e, :, :ffn].T.contiguous()
            out[expert + names[1] + ".weight"] = w13[e, :, ffn:].T.contiguous()
            out[expert + names[2] + ".weight"] = w2[e].T.contiguous()
        if not mixtral:
            out.update(_shared_expert(state, src + "mlp.shared_experts.", block, model.dim))
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _dense_mlp(state: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    return {dst + "gate_proj.weight": state[src + "w1.weight"], dst + "up_proj.weight": state[src + "w3.weight"],
            dst + "down_proj.weight": state[src + "w2.weight"]}


def _shared_expert(state: dict[str, torch.Tensor], src: str, dst: str, dim: int) -> dict[str, torch.Tensor]:
    """Qwen2-MoE's shared expert and its gate (item 4 of the module docstring). Without shared
    experts: a zero-width one (``shared_expert_intermediate_size = 0``), whose output is zero."""
    if src + "w1.weight" in state:
        w1, w3 = state[src + "w1.weight"], state[src + "w3.weight"]
        down = state[src + "w2.weight"] * 2
    else:
        dtype = next(iter(state.values())).dtype
        w1 = w3 = torch.zeros(0, dim, dtype=dtype)
        down = torch.zeros(dim, 0, dtype=dtype)
    return {dst + "shared_expert.gate_proj.weight": w1, dst + "shared_expert.up_proj.weight": w3,
            dst + "shared_expert.down_proj.weight": down,
            dst + "shared_expert_gate.weight": torch.zeros(1, dim, dtype=w1.dtype)}


# --------------------------------------------------------------------------------------------
# Import: HF dense Llama -> moe_dist (dense MLPs, upcycled by models/upcycle.py)
# --------------------------------------------------------------------------------------------

IMPORTABLE_MODEL_TYPES = ("llama",)


def hf_rope_theta(hf_config: dict[str, Any]) -> float | None:
    """The RoPE base of a config.json (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``)."""
    params = hf_config.get("rope_parameters") or {}
    return params.get("rope_theta", hf_config.get("rope_theta"))


def check_llama_config(hf_config: dict[str, Any], model: ModelConfig, source: str) -> None:
    """A ConfigError listing every way the HF config differs from ``model`` (with the override
    that fixes it), or every feature moe_dist's Transformer lacks (GQA, biases, RoPE scaling)."""
    model_type = hf_config.get("model_type")
    if model_type not in IMPORTABLE_MODEL_TYPES:
        raise ConfigError(f"model.init_from={source}: model_type {model_type!r} is not a dense Llama-style model; "
                          f"only {list(IMPORTABLE_MODEL_TYPES)} can be imported")
    if model.arch != "transformer":
        raise ConfigError(f"model.init_from={source}: a Llama initialises model.arch=transformer only, "
                          f"not {model.arch!r}")
    heads = hf_config.get("num_attention_heads")
    unsupported = []
    if hf_config.get("num_key_value_heads", heads) != heads:
        unsupported.append(f"grouped-query attention (num_key_value_heads={hf_config['num_key_value_heads']} "
                           f"!= num_attention_heads={heads}); moe_dist's attention has one key/value head per head")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            unsupported.append(f"{flag}=true (moe_dist's projections have no biases)")
    if hf_config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf_config['hidden_act']!r} (moe_dist's MLPs are SwiGLU: silu)")
    rope_type = (hf_config.get("rope_parameters") or {}).get("rope_type", "default")
    if hf_config.get("rope_scaling") or rope_type != "default":
        unsupported.append(f"RoPE scaling ({hf_config.get('rope_scaling') or rope_type}); moe_dist has plain RoPE")
    if unsupported:
        raise ConfigError(f"model.init_from={source} uses what moe_dist's Transformer lacks: " + "; ".join(unsupported))
    wanted = {"model.dim": hf_config.get("hidden_size"), "model.n_layers": hf_config.get("num_hidden_layers"),
              "model.n_heads": heads, "model.ffn_dim": hf_config.get("intermediate_size"),
              "model.norm_eps": hf_config.get("rms_norm_eps"), "model.rope_theta": hf_rope_theta(hf_config),
              "model.tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
              "model.vocab_size": hf_config.get("vocab_size")}
    have = {"model.dim": model.dim, "model.n_layers": model.n_layers, "model.n_heads": model.n_heads,
            "model.ffn_dim": model.ffn_dim, "model.norm_eps": model.norm_eps, "model.rope_theta": model.rope_theta,
            "model.tie_embeddings": model.tie_embeddings, "model.vocab_size": model.vocab_size}
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hf_config.get("hidden_size"):
        raise ConfigError(f"model.init_from={source}: head_dim={head_dim} x {heads} heads != hidden_size "
                          f"{hf_config.get('hidden_size')}; moe_dist's heads split model.dim")
    differ = [f"{key}={wanted[key]} (config has {have[key]})" for key in wanted
              if wanted[key] is not None and _differs(wanted[key], have[key])]
    if differ:
        raise ConfigError(f"model.init_from={source} does not match the model config; set " + ", ".join(differ))


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) > 1e-12 * max(abs(float(a)), abs(float(b)), 1.0)
    return a != b


def llama_to_state(tensors: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                   tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """A HF Llama's tensors -> moe_dist's names for a dense Transformer (every block a SwiGLU)."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(f"the Hugging Face checkpoint lacks tensor {name}")
        return tensors[name]

    state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    state["output.weight"] = state["tok_embeddings.weight"] if tie_embeddings else take("lm_head.weight")
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        state[dst + "attention_norm.weight"] = take(src + "input_layernorm.weight")
        state[dst + "mlp_norm.weight"] = take(src + "post_attention_layernorm.weight")
        state[dst + "attention.wq.weight"] = half_split_to_interleaved(take(src + "self_attn.q_proj.weight"), n_heads)
        state[dst + "attention.wk.weight"] = half_split_to_interleaved(take(src + "self_attn.k_proj.weight"), n_heads)
        state[dst + "attention.wv.weight"] = take(src + "self_attn.v_proj.weight")
        state[dst + "attention.wo.weight"] = take(src + "self_attn.o_proj.weight")
        for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            state[f"{dst}mlp.{mine}.weight"] = take(f"{src}mlp.{theirs}.weight")
    return state
