"""Initial weights from another model's state dict (``model.init_from``): copied where names
and shapes match, upcycled where the target's MoE layer meets a dense SwiGLU MLP in the source.

Two upcycling modes (``model.upcycle_mode``), for a dense MLP ``w2(silu(w1 x) * w3 x)`` of width F
becoming E routed experts of width F_e (+ S shared experts, one SwiGLU of width S*F_e):

* **copy** (sparse upcycling, Komatsuzaki et al. 2022): every routed expert is the dense MLP
  (F_e = F), plus optional Gaussian noise (``model.upcycle_noise_std``). When the router's
  combine weights sum to one (renormalised top-k, or a renormalised sigmoid gate) the layer
  computes ``sum_k w_k MLP(x) = MLP(x)`` whatever the router says, so the router keeps its random
  init and routes diversely from step 0. When they do not (top-1 softmax, ``normalize_weights``
  false) the router starts at zero, so every weight is the uniform score p0 (1/E softmax, 1/2
  sigmoid), and the experts' ``w2`` is scaled by ``1/(k p0)``. Shared experts start with the
  dense ``w1``/``w3`` and a zero ``w2``: they add nothing at step 0 and learn from step 1.
  Without noise, step 0 computes the dense model's function (tested to float rounding).
* **partition** (MoEfication, Zhang et al. 2022; LLaMA-MoE, Zhu et al. 2024, random split):
  the F neurons are shuffled (seeded by ``train.seed``) and split into E + S groups of F_e, so
  (E + S) * F_e = F; group e < E becomes routed expert e, the last S groups the shared experts.
  Each neuron lands in exactly one expert. A token now sees only its k routed groups, so the
  routed experts' ``w2`` is scaled by ``E / (k w0)`` (w0: a selected expert's combine weight
  under a near-uniform router, 1/k when renormalised): each selected group then counts E/k
  times, an unbiased estimate of the dense sum when groups are picked uniformly. Step 0 differs
  from the dense model; docs/interop.md gives the measured loss difference.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

from moe_dist.config import ConfigError, MoEConfig
from moe_dist.moe.layer import MoELayer

UpcycleMode = Literal["copy", "partition"]
_ROUTER_STATE = re.compile(r"\.router\.expert_bias$")  # routing state: keeps its fresh init


def combine_weights_sum_to_one(moe: MoEConfig) -> bool:
    router = moe.router
    return router.normalize_weights and (router.top_k > 1 or router.type == "sigmoid_topk")


def uniform_score(moe: MoEConfig) -> float:
    """The gate score every expert gets from a zero router: softmax 1/E, sigmoid 1/2."""
    return 0.5 if moe.router.type == "sigmoid_topk" else 1.0 / moe.num_experts


def typical_weight(moe: MoEConfig) -> float:
    """A selected expert's combine weight under a near-uniform router: 1/k when the weights
    sum to one, else the uniform score."""
    return 1.0 / moe.router.top_k if combine_weights_sum_to_one(moe) else uniform_score(moe)


def partition_scale(moe: MoEConfig) -> float:
    """Factor on a partitioned expert's ``w2``: a selected group then counts E/k times."""
    return moe.num_experts / (moe.router.top_k * typical_weight(moe))


def partition_neurons(ffn_dim: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """``[groups, ffn_dim // groups]`` neuron indices: a seeded shuffle of ``range(ffn_dim)`` cut
    into equal groups, so every neuron is in exactly one group."""
    if groups < 1 or ffn_dim % groups:
        raise ConfigError(f"cannot partition {ffn_dim} neurons into {groups} equal groups")
    return torch.randperm(ffn_dim, generator=generator).view(groups, ffn_dim // groups)


def _check_router(moe: MoEConfig) -> None:
    if moe.router.type not in ("softmax_topk", "sigmoid_topk"):
        raise ConfigError(f"upcycling needs a fixed top-k token-choice router (moe.router.type softmax_topk or "
                          f"sigmoid_topk), not {moe.router.type!r}: the step-0 function depends on the combine "
                          "weights of a known top-k")


@torch.no_grad()
def upcycle_layer(layer: MoELayer, dense: dict[str, torch.Tensor], moe: MoEConfig, mode: UpcycleMode,
                  noise_std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The MoE layer's tensors (names relative to the layer) from a dense SwiGLU's ``w1``, ``w3``,
    ``w2`` weights (``nn.Linear`` layout: ``w1, w3: [F, D]``, ``w2: [D, F]``)."""
    _check_router(moe)
    w1, w3, w2 = dense["w1.weight"], dense["w3.weight"], dense["w2.weight"]
    ffn, experts, shared = w1.shape[0], moe.num_experts, moe.num_shared_experts
    expert_ffn = layer.expert_ffn_dim
    top_k = moe.router.top_k
    out = {"router.weight": layer.router.weight.detach().clone()}
    if mode == "copy":
        if expert_ffn != ffn:
            raise ConfigError(f"model.upcycle_mode=copy makes every expert a copy of the dense MLP, so "
                              f"moe.expert_ffn_dim ({expert_ffn}) must equal its width ({ffn}); set "
                              f"moe.expert_ffn_dim={ffn}, or use model.upcycle_mode=partition")
        scale = 1.0
        if not combine_weights_sum_to_one(moe):
            out["router.weight"].zero_()
            scale = 1.0 / (top_k * uniform_score(moe))
        groups = torch.arange(ffn).expand(experts, ffn)
        shared_rows = torch.arange(ffn).repeat(shared)
    elif mode == "partition":
        if (experts + shared) * expert_ffn != ffn:
            fix = (f"set moe.expert_ffn_dim={ffn // (experts + shared)}" if ffn % (experts + shared) == 0 else
                   f"choose moe.num_experts + moe.num_shared_experts dividing {ffn}")
            raise ConfigError(f"model.upcycle_mode=partition splits the dense MLP's {ffn} neurons among the "
                              f"{experts} routed + {shared} shared experts, so (moe.num_experts + "
                              f"moe.num_shared_experts) * moe.expert_ffn_dim must be {ffn}, got "
                              f"({experts} + {shared}) * {expert_ffn}; {fix}")
        scale = partition_scale(moe)
        partition = partition_neurons(ffn, experts + shared, generator)
        groups, shared_rows = partition[:experts], partition[experts:].reshape(-1)
    else:
        raise ConfigError(f"model.upcycle_mode must be 'copy' or 'partition', not {mode!r}")

    w13 = torch.cat([w1[groups], w3[groups]], dim=1).transpose(1, 2)  # [E, D, 2F_e]
    w2_experts = w2[:, groups].permute(1, 2, 0) * scale  # [E, F_e, D]
    if noise_std > 0:
        w13 = w13 + noise_std * torch.randn(w13.shape, generator=generator, dtype=w13.dtype)
        w2_experts = w2_experts + noise_std * torch.randn(w2_experts.shape, generator=generator, dtype=w2.dtype)
    out["experts.w13"], out["experts.w2"] = w13.contiguous(), w2_experts.contiguous()
    if layer.shared_experts is not None:
        out["shared_experts.w1.weight"] = w1[shared_rows].clone()
        out["shared_experts.w3.weight"] = w3[shared_rows].clone()
        out["shared_experts.w2.weight"] = (torch.zeros_like(w2[:, shared_rows]) if mode == "copy"
                                           else w2[:, shared_rows].clone())
    return out


@torch.no_grad()
def initial_state(model: nn.Module, source: dict[str, torch.Tensor], moe: MoEConfig, mode: UpcycleMode = "copy",
                  noise_std: float = 0.0, seed: int = 0, source_name: str = "the source") -> dict[str, torch.Tensor]:
    """``model``'s full state dict built from ``source``: tensors of the same name and shape are
    copied, MoE layers whose source block is a dense SwiGLU are upcycled. Anything else (a tensor
    missing from the source or of another shape, a source tensor left over) is a ConfigError
    listing them all. ``model`` itself is not changed."""
    generator = torch.Generator().manual_seed(seed)
    target = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    moe_layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    for index, layer in moe_layers:
        prefix = f"layers.{index}.mlp."
        dense_keys = {name: prefix + name for name in ("w1.weight", "w3.weight", "w2.weight")}
        if not isinstance(layer, MoELayer) or not all(key in source for key in dense_keys.values()):
            continue
        dense = {name: source[key] for name, key in dense_keys.items()}
        for name, tensor in upcycle_layer(layer, dense, moe, mode, noise_std, generator).items():
            state[prefix + name] = tensor
        used |= set(dense_keys.values())
    problems = []
    for name, tensor in target.items():
        if name in state:
            continue
        if name in source and tuple(source[name].shape) == tuple(tensor.shape):
            state[name] = source[name]
            used.add(name)
        elif name in source:
            problems.append(f"{name}: {source_name} has shape {tuple(source[name].shape)}, the model "
                            f"{tuple(tensor.shape)}")
        elif _ROUTER_STATE.search(name):
            state[name] = tensor.clone()
        else:
            problems.append(f"{name} (shape {tuple(tensor.shape)}) is not in {source_name}")
    problems += [f"{name} of {source_name} has no place in the model" for name in sorted(set(source) - used)
                 if name not in target]
    if problems:
        listed = "\n  ".join(problems[:20])
        raise ConfigError(f"model.init_from: {source_name} does not fit the model ({len(problems)} problem(s)); "
                          f"dense MLPs upcycle into MoE layers, everything else must match in name and shape:\n  "
                          f"{listed}")
    for name, tensor in state.items():
        state[name] = tensor.to(dtype=target[name].dtype)
    return state
