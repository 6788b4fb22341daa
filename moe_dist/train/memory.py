"""Memory per rank before launch: parameters, gradients, optimizer state and activations.

:func:`estimate_memory` builds the model on the meta device (no storage: a 30B-parameter config
takes seconds on a CPU), shards its parameter counts the way the configured mesh and engine will,
and adds an activation estimate for one micro-batch. ``moe-dist train --dry-run`` prints it, also
for a world larger than the machine (``--world-size 64``).

What each element costs (bytes), by engine:

=====================  =========  ==========  ==========================================
engine                 params     gradients   optimizer (AdamW)
=====================  =========  ==========  ==========================================
native, fp32 or bf16   4 (fp32)   4           8 (exp_avg, exp_avg_sq); 4 with
  autocast                                    train.optimizer_state_dtype=bf16
DeepSpeed, bf16        2 (bf16)   2           12 (fp32 master + exp_avg + exp_avg_sq)
DeepSpeed, fp32        4          4           8
native,                2 (bf16)   4 (fp32     12 on the host (fp32 master + exp_avg +
  offload_optimizer               buffer)     exp_avg_sq); 0 on the device
=====================  =========  ==========  ==========================================

Sharding: expert weights are divided over ``ep x etp``, the tensor-parallel weights (embedding,
attention projections, dense MLPs, output head) over ``tp``. ZeRO-1 partitions the optimizer
state, ZeRO-2 the gradients too, over the data-parallel ranks (dense parameters) or the
expert-data-parallel ranks (experts); optimizer offload moves the optimizer state to the host.
FSDP (``parallel.fsdp``) shards parameters, gradients and optimizer state (fp32: 4 + 4 + 8 bytes)
over dp (dense) and edp (experts) and adds the gathered compute copies of two blocks (the one
running and the prefetched one).

Activations, per token of a micro-batch and per block (``h`` hidden, ``f`` dense FFN, ``f_e``
expert FFN, ``k`` experts per token, ``E`` experts; ``a`` compute-dtype bytes, 4 for the fp32
residual stream), the tensors autograd keeps for backward:

* attention: norm input ``4h``; normalised input cast for the projections, q, k, v, rotated q and
  k, SDPA output: ``7h*a`` (SDPA's memory-efficient kernels keep no S x S matrix);
* dense SwiGLU MLP: norm input ``4h``; cast input, gate, up, activation, product: ``(h + 4f)*a``;
* MoE MLP: norm input ``4h``; cast input ``h*a``; router logits and probabilities ``8E``; per
  routed copy the permuted row, gate/up, activation, product and expert output:
  ``k*(2h + 4f_e)*a`` (``2f_e`` for ReLU experts: up and ReLU); shared experts like a dense
  MLP of width ``f_e * shared``. With expert tensor parallelism (``etp``) a rank computes the
  rows of its whole etp group (all-gathered) on its ``f_e/etp`` columns, so per routed copy it
  keeps ``etp`` input rows, ``4f_e`` of intermediates (``etp`` rows of ``4f_e/etp``) and one
  (reduce-scattered) output row: ``k*((etp + 1)*h + 4f_e)*a``;
* output: final norm ``4h``, logits and their gradient ``2V*a``.

``activation_checkpointing``: ``full`` keeps only each block's input (``4h``) and recomputes one
block at a time during backward (that block's activations are added once); ``selective``
recomputes the attention (which then keeps its fp32 normalised input, ``4h``, instead of ``7h*a``)
and the expert MLPs (which keep their input and output rows, ``k*(etp + 1)*h*a``, instead of
``k*((etp + 1)*h + 4f_e)*a``). With sequence parallelism the per-token activations of a block are divided by
``tp``. The estimate is a model of the allocator's peak, not a measurement: docs/performance.md
compares it with measured peaks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moe_dist.config import Config
from moe_dist.data.tokenizer import nominal_vocab_size
from moe_dist.distributed.mesh import MeshLayout
from moe_dist.models.hmoe import HMoELayer, place_experts
from moe_dist.models.registry import build_model
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer

GIB = 1024 ** 3
TP_SHARDED_SUFFIXES = ("tok_embeddings.weight", "output.weight", "attention.wq.weight", "attention.wk.weight",
                       "attention.wv.weight", "attention.wo.weight")
TP_SHARDED_DENSE_MLP = ("mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (the busiest rank: every rank holds equal shards)."""

    total_params: int
    """Parameters of the whole model."""
    active_params: int
    """Parameters one token uses: routed experts count ``top_k / num_experts`` of their weights
    (``top_k`` is the cap for variable-k routers, so this is an upper bound for them)."""
    rank_params: int
    """Parameters one rank holds after TP/EP sharding."""
    params: float
    gradients: float
    optimizer: float
    optimizer_on_host: float
    activations: float
    device_memory: float | None
    """What the device offers (None when unknown, e.g. a CPU dry run for a GPU job)."""

    @property
    def total(self) -> float:
        return self.params + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def describe(self) -> str:
        """The table ``--dry-run`` prints (parameter counts: ``train.summary.run_summary``)."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024 ** 2)

        def gib(value: float) -> str:
            return f"{value / scale:8.2f} {unit}"

        lines = ["memory per rank (estimate):",
                 f"  parameters   {gib(self.params)}",
                 f"  gradients    {gib(self.gradients)}",
                 f"  optimizer    {gib(self.optimizer)}"
                 + (f"   (+{self.optimizer_on_host / GIB:.2f} GiB on the host)" if self.optimizer_on_host else ""),
                 f"  activations  {gib(self.activations)}",
                 f"  total        {gib(self.total)}"]
        if self.device_memory is not None:
            lines.append(f"  device       {gib(self.device_memory)}")
        return "\n".join(lines)


def _shard_counts(model: nn.Module, layout: MeshLayout) -> tuple[int, int, int]:
    """(total, dense elements on one rank, expert elements on one rank)."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    peer_tables = {id(m.down.weight) for m in model.modules() if hasattr(m, "set_table_lookup")} | \
                  {id(m.up.weight) for m in model.modules() if hasattr(m, "set_table_lookup")}
    moe_mlps = {name for name, m in model.named_modules() if isinstance(m, MoELayer)}
    total = dense = experts = 0
    hetero_ids: set[int] = set()  # HMoE experts: the busiest rank of the width placement
    for m in model.modules():
        if isinstance(m, HMoELayer):
            sizes = [sum(p.numel() for p in m.experts[str(e)].parameters()) for e in range(m.num_experts)]
            experts += max(sum(sizes[e] for e in ids) for ids in place_experts(m.widths, layout.ep))
            hetero_ids |= {id(p) for p in m.experts.parameters()}
    for name, param in {n: p for n, p in model.named_parameters()}.items():
        numel = param.numel()
        total += numel
        if id(param) in hetero_ids:
            continue
        if id(param) in expert_ids:
            experts += numel // (layout.ep * layout.etp)
        elif id(param) in peer_tables:
            experts += numel // layout.ep
        elif name.endswith(TP_SHARDED_SUFFIXES) or (
                name.endswith(TP_SHARDED_DENSE_MLP) and name.rsplit(".", 2)[0] not in moe_mlps):
            dense += numel // layout.tp
        else:
            dense += numel
    return total, dense, experts


def _largest_block_params(model: nn.Module, layout: MeshLayout) -> int:
    """Parameters of the largest transformer block on one rank (experts divided by ep x etp)."""
    largest = 0
    for block in getattr(model, "layers", []):
        expert_ids = {id(p) for m in block.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
        count = sum(p.numel() // (layout.ep * layout.etp) if id(p) in expert_ids else p.numel()
                    for p in block.parameters())
        largest = max(largest, count)
    return largest


def _activation_bytes_per_token(cfg: Config, model: nn.Module, act_bytes: int, checkpointing: str) -> float:
    dim = cfg.model.dim
    blocks = list(getattr(model, "layers", []))
    per_block: list[float] = []
    for block in blocks:
        # selective: the recomputed attention keeps only its (fp32) normalised input
        attention = 8 * dim if checkpointing == "selective" else 4 * dim + 7 * dim * act_bytes
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, MoELayer):
            k, etp = cfg.moe.router.top_k, cfg.parallel.etp
            f_e = mlp.expert_ffn_dim
            rows = (etp + 1) * dim  # etp gathered input rows (1 without etp), one output row
            # SwiGLU keeps gate/up, activation and product (4 f_e); ReLU experts up and ReLU (2 f_e)
            intermediates = 2 * getattr(mlp.experts, "fused_parts", 2) * f_e
            routed = k * (rows + intermediates) * act_bytes
            if checkpointing == "selective":  # the experts keep their input rows and output rows
                routed = k * rows * act_bytes
            shared = (dim + 4 * f_e * cfg.moe.num_shared_experts) * act_bytes if cfg.moe.num_shared_experts else 0
            mlp_bytes = 4 * dim + dim * act_bytes + 8 * cfg.moe.num_experts + routed + shared
        else:
            ffn = cfg.model.ffn_dim or 4 * dim
            mlp_bytes = 4 * dim + (dim + 4 * ffn) * act_bytes
        per_block.append(attention + mlp_bytes)
    if checkpointing == "full":
        kept = 4 * dim * len(blocks) + max(per_block, default=0.0)
    else:
        kept = sum(per_block)
    return kept


def estimate_memory(cfg: Config, world_size: int, device_memory: float | None = None,
                    checkpointing: str = "none") -> MemoryEstimate:
    """Per-rank memory of training ``cfg`` on ``world_size`` ranks (see the module docstring)."""
    layout = MeshLayout.from_config(cfg.parallel, world_size)
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = nominal_vocab_size(cfg.data)  # a Hugging Face tokenizer is loaded to count it
    with torch.device("meta"):
        model = build_model(model_cfg, cfg.moe)
    total, dense, experts = _shard_counts(model, layout)
    routed = sum(p.numel() * (1 - min(cfg.moe.router.top_k, m.num_experts) / m.num_experts)
                 for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    routed += sum(p.numel() * (1 - min(m.top_k, m.num_experts) / m.num_experts)  # HMoE, uniform routing
                  for m in model.modules() if isinstance(m, HMoELayer) for p in m.experts.parameters())

    on_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and (on_gpu or device_memory is not None))
    act_bytes = 2 if bf16 else 4
    deepspeed = cfg.train.engine == "deepspeed"
    stage = cfg.zero.stage if deepspeed else 0
    if deepspeed and bf16:
        param_b, grad_b, optim_b = 2, 2, 12
    else:
        param_b, grad_b, optim_b = 4, 4, 4 if cfg.train.optimizer_state_dtype == "bf16" else 8
    optim_div_dense = layout.dp if stage >= 1 else 1
    optim_div_expert = layout.edp if stage >= 1 else 1
    grad_div_dense = layout.dp if stage >= 2 else 1
    grad_div_expert = layout.edp if stage >= 2 else 1

    params = (dense + experts) * param_b
    gradients = dense * grad_b / grad_div_dense + experts * grad_b / grad_div_expert
    optimizer = dense * optim_b / optim_div_dense + experts * optim_b / optim_div_expert
    if cfg.parallel.fsdp:  # FSDP2: everything sharded, plus the gathered compute copies in flight
        shards = dense / layout.dp + experts / layout.edp
        params, gradients, optimizer = shards * 4, shards * 4, shards * 8
        params += 2 * _largest_block_params(model, layout) * act_bytes  # this block and the prefetched one
    on_host = 0.0
    if deepspeed and cfg.zero.offload_optimizer:
        optimizer, on_host = 0.0, optimizer
    if cfg.train.offload_optimizer:  # native offload (one process): compute copy + fp32 grad buffer
        params, gradients = (dense + experts) * act_bytes, (dense + experts) * 4
        optimizer, on_host = 0.0, (dense + experts) * 12.0

    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    per_token = _activation_bytes_per_token(cfg, model, act_bytes, checkpointing)
    if layout.tp > 1 and cfg.parallel.sequence_parallel:
        per_token /= layout.tp
    vocab_local = model_cfg.vocab_size  # logits are gathered to the full vocabulary per rank
    output = tokens * (4 * model_cfg.dim + 2 * vocab_local * act_bytes)
    activations = tokens * per_token + output
    return MemoryEstimate(total, int(round(total - routed)), dense + experts, params, gradients, optimizer, on_host, activations,
                          device_memory)
