"""Tokens/s and MFU of a full training step: a ~1B-parameter MoE LM (~0.3B active) against the
dense LM with the same active parameters.

Step = forward in bf16 autocast (fp32 master weights) + cross-entropy (+ router losses) +
backward + AdamW step + zero_grad. The cross-entropy is the trainer's
(``moe_dist.models.cross_entropy.token_cross_entropy``: fused Triton on CUDA, no fp32 logits). Models are moe_dist's ``Transformer``:

* ``moe``: dim 1024, 12 layers, 16 heads, every MLP an MoE of 8 SwiGLU experts (ffn 2816),
  top-2, dropless, vocab 32768 -> 0.95B parameters, 0.33B active per token.
* ``dense``: the same with one dense SwiGLU of ffn 5632 per layer (same active parameters).

MFU = tokens/s x training FLOPs per token (``moe_dist.metrics.flops``: matmuls only, attention
scores included) / the datasheet bf16 peak (989 TFLOP/s for an H100 SXM); ``mfu_measured_peak``
divides by the dense-GEMM rate measured in the same process instead.

``--compile-mode`` picks the ``torch.compile`` mode: ``reduce-overhead`` runs the compiled
forward and backward as CUDA graphs (the record counts Inductor's fallbacks from them in
``cudagraph_skips``), ``max-autotune-no-cudagraphs`` autotunes the GEMMs (minutes of compiling).
``build_setup`` is shared with ``benchmarks/logging_cost.py`` and ``benchmarks/profile_step.py``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import (emit, error_record, gpu_name, log, pick_device, reference_kernels_only,
                               resolve_repeats, time_call)
from moe_dist.config import CapacityConfig, ModelConfig, MoEConfig, RouterConfig
from moe_dist.metrics.flops import peak_tflops, training_flops_per_token
from moe_dist.models.transformer import Transformer
from moe_dist.models.cross_entropy import token_cross_entropy
from moe_dist.train.adamw_bf16_moments import AdamWBf16Moments
from moe_dist.train.optim import adamw_implementation, fused_by_default

FULL = dict(dim=1024, n_layers=12, n_heads=16, expert_ffn=2816, experts=8, top_k=2, vocab=32768,
            seq_len=2048, batch=8)
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]
TINY = dict(dim=64, n_layers=2, n_heads=4, expert_ffn=32, experts=4, top_k=2, vocab=256, seq_len=32, batch=2)


def build(kind: str, size: dict, grouped_gemm: str = "auto") -> tuple[ModelConfig, MoEConfig]:
    dense_ffn = size["expert_ffn"] * size["top_k"]
    model_cfg = ModelConfig(dim=size["dim"], n_layers=size["n_layers"], n_heads=size["n_heads"],
                            ffn_dim=dense_ffn, vocab_size=size["vocab"], max_seq_len=size["seq_len"])
    if kind == "dense":
        return model_cfg, MoEConfig(num_experts=0, every=0)
    return model_cfg, MoEConfig(num_experts=size["experts"], expert_ffn_dim=size["expert_ffn"],
                                grouped_gemm=grouped_gemm, router=RouterConfig(top_k=size["top_k"], aux_loss_coef=0.01),
                                capacity=CapacityConfig(policy="dropless"))


def measured_gemm_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = time_call(lambda: a @ b, device, warmup=5, iters=20)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


@dataclass
class StepLosses:
    """What one step returns: the device-side losses (the trainer's ``DeviceMeans`` inputs)."""

    total: torch.Tensor
    lm_loss: torch.Tensor
    router_losses: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None


@dataclass
class TrainSetup:
    """One model ready to train: ``step()`` runs forward, loss, backward, AdamW and zero_grad."""

    kind: str
    model: Transformer
    """The eager module (the compiled step runs it through ``torch.compile``)."""
    model_cfg: ModelConfig
    moe_cfg: MoEConfig
    optimizer: torch.optim.Optimizer
    step: Callable[[], StepLosses]
    params: int
    active_params: int
    flops_per_token: float
    tokens_per_step: int


def compile_mode_label(mode: str | None) -> str:
    """'' for eager, '_compiled' for the default mode, '_compiled_<mode>' otherwise."""
    if mode is None:
        return ""
    return "_compiled" if mode == "default" else f"_compiled_{mode}"


def build_setup(kind: str, size: dict, device: torch.device, optimizer: str = "auto",
                compile_mode: str | None = None,
                clip_grad: Callable[[torch.nn.Module], torch.Tensor] | None = None,
                grouped_gemm: str = "auto", optimizer_state_dtype: str = "fp32") -> TrainSetup:
    """The benchmarked model, optimizer and step. ``compile_mode`` None runs eagerly, else the
    model goes through ``torch.compile(mode=...)`` ('default', 'reduce-overhead': CUDA graphs of
    the compiled forward and backward, 'max-autotune-no-cudagraphs'). ``clip_grad(model)``, if
    given, runs between backward and the optimizer step and its result is the step's grad norm.
    ``grouped_gemm`` is the MoE model's ``moe.grouped_gemm``; ``optimizer_state_dtype`` 'bf16' takes
    the bf16-moment AdamW (``train.optimizer_state_dtype``)."""
    torch.manual_seed(0)
    model_cfg, moe_cfg = build(kind, size, grouped_gemm)
    model = Transformer(model_cfg, moe_cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    flops = training_flops_per_token(model_cfg, moe_cfg, size["seq_len"])
    active = params - (0 if kind == "dense" else
                       model_cfg.n_layers * 3 * model_cfg.dim * moe_cfg.expert_ffn_dim
                       * (moe_cfg.num_experts - moe_cfg.router.top_k))
    if optimizer_state_dtype == "bf16":
        adamw = AdamWBf16Moments(model.parameters(), lr=1e-4, weight_decay=0.1)
    else:  # train.optimizer_impl, resolved as the native engine does ('auto': fused on CUDA)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  **adamw_implementation(optimizer, fused_by_default(device, fsdp=False)))
    if compile_mode is None:
        forward = model
    else:
        forward = torch.compile(model, **({} if compile_mode == "default" else {"mode": compile_mode}))
    graphs = compile_mode == "reduce-overhead"
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step() -> StepLosses:
        if graphs:  # a new iteration for CUDA-graph trees: the last step's graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            out = forward(inputs)
            lm_loss = token_cross_entropy(out.logits, targets)
            router_losses = {name: value.float() for name, value in out.losses.items()}
            if graphs:  # the next replay overwrites a CUDA graph's outputs; the losses outlive the step
                router_losses = {name: value.clone() for name, value in router_losses.items()}
            loss = lm_loss
            for value in router_losses.values():
                loss = loss + value
        loss.backward()
        grad_norm = clip_grad(model) if clip_grad is not None else None
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        return StepLosses(loss, lm_loss, router_losses, grad_norm)

    return TrainSetup(kind, model, model_cfg, moe_cfg, adamw, step, params, active, flops.total,
                      size["batch"] * size["seq_len"])


def cudagraph_skips() -> int:
    """How often Inductor has fallen back from CUDA graphs in this process (it logs the reason)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def run(kind: str, size: dict, args, device: torch.device, gemm_tflops: float | None) -> dict:
    fused = "_triton_fused" if kind == "moe" and args.grouped_gemm == "triton_fused" else ""
    base = {"bench": "train_step", "model": kind, "system": "moe_dist" + fused + compile_mode_label(args.compile_mode),
            "compile_mode": args.compile_mode or "eager",
            "optimizer": "bf16_moments" if args.optimizer_state_dtype == "bf16" else args.optimizer,
            "seq_len": size["seq_len"], "batch": size["batch"], "device": gpu_name(device)}
    try:
        skips_before = cudagraph_skips()
        setup = build_setup(kind, size, device, args.optimizer, args.compile_mode, grouped_gemm=args.grouped_gemm,
                            optimizer_state_dtype=args.optimizer_state_dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_ms = time_call(setup.step, device, warmup=args.warmup, iters=args.iters)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        skips = cudagraph_skips() - skips_before
    except Exception as exc:
        log(f"[train_step] {kind} failed: {exc!r}")
        return error_record(base, exc)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tokens_per_s = setup.tokens_per_step / (step_ms * 1e-3)
    achieved = tokens_per_s * setup.flops_per_token / 1e12
    peak = peak_tflops(device)
    record = {**base, "status": "ok", "params_m": round(setup.params / 1e6, 3),
              "active_params_m": round(setup.active_params / 1e6, 3),
              "step_ms": round(step_ms, 2), "tokens_per_s": round(tokens_per_s), "tflops": round(achieved, 1),
              "mfu": round(achieved / peak, 4) if peak else None,
              "mfu_measured_peak": round(achieved / gemm_tflops, 4) if gemm_tflops else None,
              "gemm_tflops": round(gemm_tflops, 1) if gemm_tflops else None,
              "flops_per_token_g": round(setup.flops_per_token / 1e9, 3), "peak_mem_gib": round(peak_mem, 2)}
    if args.compile_mode == "reduce-overhead":
        record["cudagraph_skips"] = skips  # > 0: some graph ran without CUDA graphs (see the log)
    return record


def add_optimizer_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer", default="auto", choices=["auto", "fused", "foreach", "for_loop"],
                        help="train.optimizer_impl of the AdamW ('auto': fused on CUDA, the loop on CPU)")
    parser.add_argument("--optimizer-state-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="train.optimizer_state_dtype ('bf16': the bf16-moment AdamW)")


def add_grouped_gemm_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grouped-gemm", default="auto", choices=["auto", "triton_fused"],
                        help="the MoE model's moe.grouped_gemm (triton_fused: SwiGLU in the GEMM epilogues)")


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (mode 'default')")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                        help="torch.compile mode (implies --compile); 'reduce-overhead' captures the "
                             "compiled forward and backward in CUDA graphs")


def resolve_compile_mode(args) -> None:
    """``args.compile_mode``: None (eager) or the torch.compile mode."""
    if args.compile and args.compile_mode is None:
        args.compile_mode = "default"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--models", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    add_optimizer_arg(parser)
    add_compile_args(parser)
    add_grouped_gemm_arg(parser)
    parser.add_argument("--reference", action="store_true", help="moe_dist's plain torch path")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    device = pick_device()
    resolve_repeats(args, warmup=3, iters=10)
    resolve_compile_mode(args)
    size = TINY if args.tiny else FULL
    gemm = measured_gemm_tflops(device)
    results = []
    ctx = reference_kernels_only() if args.reference else contextlib.nullcontext()
    with ctx:
        for kind in args.models:
            record = run(kind, size, args, device, gemm)
            if args.reference:
                record["system"] += "_torch"
            emit(record)
            results.append(record)
    return results


if __name__ == "__main__":
    main()
