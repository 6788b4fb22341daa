"""Training FLOPs per token and model FLOPs utilisation (MFU).

Counting rules (the "6N" convention of Kaplan et al. and PaLM, made explicit):

* Only matrix multiplications count, 2 FLOPs per multiply-add. Norms, softmax, rotary,
  activations, the embedding lookup and the optimizer are ignored.
* Training = 3 x forward (the backward pass computes two matmuls per forward matmul: input
  gradient and weight gradient).
* Per token and layer, forward (d = model.dim, S = seq_len, f = ffn hidden size):
    - attention projections q, k, v, o:  2 * 4 * d * d
    - attention scores QK^T and PV:       2 * 2 * d * (S + 1) / 2   (causal: query t reads t keys,
      the mean over a sequence is (S + 1) / 2)
    - dense SwiGLU MLP (gate, up, down):  2 * 3 * d * f
    - MoE layer: router 2 * d * E; routed experts top_k * 2 * 3 * d * f_e; shared experts
      num_shared * 2 * 3 * d * f_e (nominal top_k: tokens dropped by a capacity limit are
      still counted, as MFU measures the model, not the dispatcher)
  and once per token the LM head: 2 * d * V.

Architectures other than 'transformer' provide their own count: a model object with a method
``flops_per_token(seq_len) -> FlopsBreakdown`` (training FLOPs) is asked first.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

TRAINING_MULTIPLIER = 3
"""Forward + backward = 3 forward passes of matmul FLOPs."""


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training (forward + backward) FLOPs per token, by part of the model."""

    dense: float
    """Dense SwiGLU MLPs plus shared experts."""
    attention: float
    """q/k/v/o projections plus attention scores (QK^T and PV, causal)."""
    experts: float
    """Routed experts actually run per token (top_k of them per MoE layer)."""
    router: float
    """Router projections of the MoE layers."""
    head: float
    """LM head (vocabulary projection)."""

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.experts + self.router + self.head

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def training_flops_per_token(model_cfg: Any, moe_cfg: Any, seq_len: int, *, model: Any = None,
                             vocab_size: int | None = None) -> FlopsBreakdown:
    """Training FLOPs per token of a decoder LM at sequence length ``seq_len``.

    ``model_cfg``/``moe_cfg`` are the ``model`` and ``moe`` config sections. If ``model`` has a
    ``flops_per_token(seq_len)`` method, its answer is returned instead (the hook for other
    architectures). ``vocab_size`` overrides ``model.vocab_size`` when that is 0 ("from the
    tokenizer").
    """
    hook = getattr(model, "flops_per_token", None)
    if callable(hook):
        result = hook(seq_len)
        if not isinstance(result, FlopsBreakdown):
            raise TypeError(f"{type(model).__name__}.flops_per_token must return a FlopsBreakdown, "
                            f"got {type(result).__name__}")
        return result
    if model_cfg.arch != "transformer":
        raise NotImplementedError(
            f"no FLOP count for model.arch={model_cfg.arch!r}: give the model a method "
            "flops_per_token(seq_len) -> FlopsBreakdown (see moe_dist/metrics/flops.py)")
    if seq_len <= 0:
        raise ValueError(f"seq_len ({seq_len}) must be positive")
    vocab = vocab_size if vocab_size is not None else model_cfg.vocab_size
    if vocab <= 0:
        raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) is not resolved yet; pass "
                         "vocab_size=<tokenizer vocabulary size>")

    d = model_cfg.dim
    dense_ffn = model_cfg.ffn_dim
    expert_ffn = moe_cfg.expert_ffn_dim or dense_ffn
    swiglu = 2 * 3 * d  # per unit of hidden size: gate, up and down projections

    attention = dense = experts = router = 0.0
    for layer in range(model_cfg.n_layers):
        attention += 2 * 4 * d * d + 2 * 2 * d * (seq_len + 1) / 2
        if moe_cfg.is_moe_layer(layer):
            router += 2 * d * moe_cfg.num_experts
            experts += moe_cfg.router.top_k * swiglu * expert_ffn
            dense += moe_cfg.num_shared_experts * swiglu * expert_ffn
        else:
            dense += swiglu * dense_ffn
    head = 2 * d * vocab
    m = TRAINING_MULTIPLIER
    return FlopsBreakdown(dense=m * dense, attention=m * attention, experts=m * experts,
                          router=m * router, head=m * head)


# --------------------------------------------------------------------------------------------
# Peak throughput and MFU
# --------------------------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s per device, from vendor data sheets.
# Matched in order against the lower-cased device name; the first pattern that matches wins.
_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"gb200", 2500.0),
    (r"b200", 2250.0),
    (r"b100", 1750.0),
    (r"h200", 989.0),
    (r"h100.*nvl", 835.0),
    (r"h100.*pcie", 756.0),
    (r"h100", 989.0),  # SXM (the name reads "NVIDIA H100 80GB HBM3")
    (r"h800", 989.0),
    (r"\bh20\b", 148.0),
    (r"a100", 312.0),
    (r"a800", 312.0),
    (r"l40s", 362.0),
    (r"\bl40\b", 181.0),
    (r"\bl4\b", 121.0),
    (r"a6000", 155.0),
    (r"a10g", 70.0),
    (r"\ba10\b", 125.0),
    (r"rtx 4090", 165.0),
    (r"v100", 125.0),  # fp16 (no bf16 on Volta)
    (r"mi300x", 1307.0),
    (r"mi250x", 383.0),
)


def peak_tflops(device: torch.device | str) -> float | None:
    """Dense bf16 peak TFLOP/s of one device, or None when unknown (CPU, unlisted GPU).

    ``device`` is a torch device (``cuda:0`` is looked up by its name) or a device name such
    as ``"NVIDIA H100 80GB HBM3"``. Override with ``log.peak_tflops`` for other dtypes or GPUs.
    """
    if isinstance(device, str) and not re.fullmatch(r"(cuda|cpu|mps|meta)(:\d+)?", device):
        name = device
    else:
        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(dev)
    lowered = name.lower()
    for pattern, tflops in _PEAK_BF16_TFLOPS:
        if re.search(pattern, lowered):
            return tflops
    return None


def resolve_peak_tflops(configured: float, device: torch.device | str) -> float | None:
    """``log.peak_tflops`` when it is positive, else the table entry for ``device``."""
    if configured < 0:
        raise ValueError(f"log.peak_tflops ({configured}) must be >= 0 (0 = look it up)")
    return configured if configured > 0 else peak_tflops(device)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None,
        num_devices: int) -> float | None:
    """Achieved / peak FLOP/s as a fraction in [0, 1] (None when the peak is unknown).

    ``tokens_per_s`` is the throughput of all ``num_devices`` devices together (unique tokens,
    not counting tensor-parallel replicas twice); ``flops_per_token`` is the training count of
    :func:`training_flops_per_token` (``.total``).
    """
    if peak_tflops is None or peak_tflops <= 0:
        return None
    if num_devices <= 0:
        raise ValueError(f"num_devices ({num_devices}) must be positive")
    return tokens_per_s * flops_per_token / (num_devices * peak_tflops * 1e12)
