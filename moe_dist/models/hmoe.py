"""Heterogeneous Mixture of Experts, HMoE (Wang et al. 2024, "HMoE: Heterogeneous Mixture of
Experts for Language Modeling", arXiv 2408.10681).

The E experts of a layer are SwiGLU MLPs of different widths w_i (``model.hmoe.widths`` or a
geometric schedule). A softmax router picks ``moe.router.top_k`` of them per token; the output is
``sum_k g_k * expert_{i_k}(x)`` with the top-k probabilities (renormalised when
``moe.router.normalize_weights``).

Routing losses, with f_i the share of the T*K routed assignments that go to expert i and P_i the
mean router probability of expert i over the T tokens:

- P-Penalty (the paper's training objective): ``E * sum_i M_i * f_i * P_i`` with
  ``M_i = w_i / mean(w)``, the expert's parameter count relative to the mean (params are 3*D*w_i).
  Routing to a large expert costs more, so tokens drift to small experts; with equal widths it is
  the Switch loss.
- Switch balance loss ``E * sum_i f_i * P_i`` (off by default: the paper reports that it pushes
  tokens toward the large experts, which lowers the loss, and replaces it by the P-Penalty).
- Router entropy ``mean_t -sum_i p_ti log p_ti`` (the paper pairs it with Top-P routing; here it
  is an optional regulariser of the top-k router).

Note on the formulas: the paper's text could not be retrieved in this session; they follow the
paper's description (size-weighted Switch loss, normalised parameter counts, entropy term). The
normalisation of M_i by the mean width is this implementation's choice (so equal widths give
exactly the Switch loss).

Expert storage and compute. Each expert keeps its own ``w13 [D, 2*w_i]`` and ``w2 [w_i, D]``
under ``experts.<global id>``, so a rank under expert parallelism holds a subset of the same
names and shapes (``models/hmoe_parallel.py``). The rows routed to the local experts are sorted by
(width, id) and computed by ``model.hmoe.gemm``:

- ``by_width`` (default): one grouped GEMM per distinct width over the experts of that width;
- ``padded``: one grouped GEMM with every expert zero-padded to the largest width;
- ``per_expert``: one matmul per expert.

All three compute the same function (tested). Measured on CPU (``docs/hmoe_gemm_bench.py``,
docs/architectures.md): padding is 1.4-2.8x slower than ``by_width``, and ``per_expert`` is the
fastest there; ``by_width`` is the default as the grouped-GEMM path meant for GPUs, where it has
not been timed yet.

Shapes: T tokens, D model dim, E experts, K top_k, N = routed rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import ConfigError, MoEConfig
from moe_dist.config.model import HMoEConfig
from moe_dist.models.arch_base import ArchTransformer
from moe_dist.moe.dispatch.permutation import count_per_expert
from moe_dist.moe.experts import grouped_matmul, to_autocast_dtype
from moe_dist.moe.stats import ExpertLoadStats


def resolve_widths(cfg: HMoEConfig, num_experts: int, mean_width: int) -> list[int]:
    """The experts' widths: ``cfg.widths`` or the geometric schedule with mean ``mean_width``."""
    if cfg.widths:
        if len(cfg.widths) != num_experts:
            raise ConfigError(f"model.hmoe.widths has {len(cfg.widths)} entries but moe.num_experts is "
                              f"{num_experts}; give one width per expert or leave it empty")
        return list(cfg.widths)
    raw = [cfg.ratio ** i for i in range(num_experts)]
    scale = mean_width * num_experts / sum(raw)
    return [max(8, 8 * round(r * scale / 8)) for r in raw]


def hmoe_losses(probs_TE: torch.Tensor, indices_TK: torch.Tensor, widths: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Unweighted (p_penalty, balance, entropy) of one layer's routing (see the module docstring)."""
    num_experts = probs_TE.shape[-1]
    counts = count_per_expert(indices_TK.flatten(), num_experts).to(probs_TE.dtype)
    f = counts / max(indices_TK.numel(), 1)
    P = probs_TE.mean(0)
    size = widths.to(probs_TE.dtype) / widths.to(probs_TE.dtype).mean()
    entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
    return {"p_penalty": num_experts * (size * f * P).sum(), "balance": num_experts * (f * P).sum(),
            "entropy": entropy}


class HeteroExpert(nn.Module):
    """One SwiGLU expert of width ``width``: ``w2^T (silu(x W_gate) * x W_up)``, ``w13 = [W_gate | W_up]``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.w13 = nn.Parameter(torch.empty(dim, 2 * width))
        self.w2 = nn.Parameter(torch.empty(width, dim))


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class HMoELayer(nn.Module):
    """Heterogeneous MoE MLP; ``forward(x) -> (out, losses)`` like ``MoELayer``."""

    def __init__(self, dim: int, moe_cfg: MoEConfig, cfg: HMoEConfig, mean_width: int) -> None:
        super().__init__()
        if moe_cfg.num_shared_experts:
            raise ConfigError("model.arch=hmoe has no shared experts; set moe.num_shared_experts=0")
        if moe_cfg.capacity.policy != "dropless":
            raise ConfigError(f"model.arch=hmoe is dropless; set moe.capacity.policy=dropless "
                              f"(got {moe_cfg.capacity.policy!r})")
        self.cfg = cfg
        self.dim = dim
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.router.top_k
        self.normalize = moe_cfg.router.normalize_weights
        self.widths = resolve_widths(cfg, self.num_experts, mean_width)
        self.register_buffer("width_of", torch.tensor(self.widths), persistent=False)
        self.router = nn.Linear(dim, self.num_experts, bias=False)
        self.experts = nn.ModuleDict({str(e): HeteroExpert(dim, w) for e, w in enumerate(self.widths)})
        self.stats = ExpertLoadStats(self.num_experts)
        self.exchange = None
        """Set by ``models/hmoe_parallel.py`` under ep > 1: sends rows to the experts' owners."""
        self._position_tables: dict[tuple, torch.Tensor] = {}
        self.register_buffer("width_seen", torch.zeros(()), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros(()), persistent=False)

    def state_names_elsewhere(self) -> list[str]:
        """State-dict names (relative to this module) of the experts another ep rank holds."""
        held = set(self.experts)
        return [f"experts.{e}.{w}" for e in range(self.num_experts) if str(e) not in held for w in ("w13", "w2")]

    # Local expert compute -----------------------------------------------------------------
    def local_ids(self) -> list[int]:
        """The experts this module holds, in compute order: by (width, global id)."""
        return sorted((int(e) for e in self.experts), key=lambda e: (self.widths[e], e))

    def _position_table(self, ids: list[int], device: torch.device) -> torch.Tensor:
        """expert id -> its position in ``ids`` (``len(ids)`` for experts held elsewhere), built
        once per (ids, device): building it copies ``ids`` to the device, a blocking copy."""
        key = (tuple(ids), str(device))
        table = self._position_tables.get(key)
        if table is None:
            table = torch.full((self.num_experts,), len(ids), dtype=torch.long)
            table[ids] = torch.arange(len(ids))
            table = self._position_tables[key] = table.to(device)
        return table

    def run_local(self, x_ND: torch.Tensor, eid_N: torch.Tensor) -> torch.Tensor:
        """``out[n] = expert_{eid[n]}(x[n])`` for rows whose experts are all held here."""
        ids = self.local_ids()
        pos_N = self._position_table(ids, x_ND.device)[eid_N]
        order = torch.argsort(pos_N, stable=True)
        # In the autocast dtype: grouped_mm is not an autocast op and would send fp32 rows to the
        # per-expert loop (a host sync per expert); unchanged on CPU.
        xs = to_autocast_dtype(x_ND).index_select(0, order)
        counts = count_per_expert(pos_N, len(ids))
        ys = self._compute(xs, counts, ids)
        out = torch.empty_like(ys)
        return out.index_copy(0, order, ys)

    def _compute(self, xs: torch.Tensor, counts: torch.Tensor, ids: list[int]) -> torch.Tensor:
        mode = self.cfg.gemm
        if mode == "padded":
            return self._grouped(xs, counts, ids, max(self.widths[e] for e in ids))
        # NOTE: device-to-host sync: the row count of every width group (by_width), every expert (per_expert).
        per_expert = counts.tolist()
        pieces, start, i = [], 0, 0
        while i < len(ids):
            j = i + 1
            if mode == "by_width":
                while j < len(ids) and self.widths[ids[j]] == self.widths[ids[i]]:
                    j += 1
            rows = sum(per_expert[i:j])
            x_g = xs[start:start + rows]
            if mode == "per_expert":
                expert = self.experts[str(ids[i])]
                pieces.append(_swiglu(x_g @ expert.w13) @ expert.w2)
            else:
                pieces.append(self._grouped(x_g, counts[i:j], ids[i:j], self.widths[ids[i]]))
            start += rows
            i = j
        return torch.cat(pieces) if pieces else xs.new_zeros(0, self.dim)

    def _grouped(self, x_g: torch.Tensor, counts: torch.Tensor, ids: list[int], width: int) -> torch.Tensor:
        """One grouped GEMM over experts ``ids`` (padded with zeros to ``width`` where narrower)."""
        w13, w2 = [], []
        for e in ids:
            expert = self.experts[str(e)]
            pad = width - expert.width
            gate, up = expert.w13.chunk(2, dim=-1)
            w13.append(torch.cat([F.pad(gate, (0, pad)), F.pad(up, (0, pad))], dim=-1) if pad else expert.w13)
            w2.append(F.pad(expert.w2, (0, 0, 0, pad)) if pad else expert.w2)
        h = grouped_matmul(x_g, torch.stack(w13), counts)
        return grouped_matmul(_swiglu(h), torch.stack(w2), counts)

    # Forward -------------------------------------------------------------------------------
    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        probs_TE = torch.softmax(self.router(x_TD).float(), dim=-1)
        weights_TK, indices_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        x_ND = x_TD.repeat_interleave(self.top_k, dim=0)  # row t*K + k
        eid_N = indices_TK.flatten()
        y_ND = self.run_local(x_ND, eid_N) if self.exchange is None else self.exchange(self, x_ND, eid_N)
        out_TD = (y_ND.view(-1, self.top_k, shape[-1]) * weights_TK.unsqueeze(-1).to(y_ND.dtype)).sum(1)

        losses: dict[str, torch.Tensor] = {}
        if self.training:
            with torch.no_grad():
                routed = count_per_expert(eid_N, self.num_experts)
                self.stats.update(routed, routed, x_TD.shape[0])
                self.width_seen += self.width_of[eid_N].sum()
                self.tokens_seen += x_TD.shape[0]
            raw = hmoe_losses(probs_TE, indices_TK, self.width_of)
            for key, coef in (("p_penalty", self.cfg.p_penalty_coef), ("balance", self.cfg.balance_coef),
                              ("entropy", self.cfg.entropy_coef)):
                if coef > 0:
                    losses[f"hmoe_{key}"] = coef * raw[key]
        return out_TD.view(shape).to(x_BSD.dtype), losses

    @torch.no_grad()
    def reset_arch_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        for expert in self.experts.values():
            nn.init.normal_(expert.w13, std=std)
            nn.init.normal_(expert.w2, std=out_std)

    def active_width(self) -> float:
        """Summed width of the experts a token uses: realised over the training forwards so far,
        ``top_k * mean(widths)`` (uniform routing) before any."""
        seen = float(self.tokens_seen)
        return float(self.width_seen) / seen if seen > 0 else self.top_k * sum(self.widths) / self.num_experts

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs: router ``2*D*E``; experts ``6*D*(active width)`` (three D x w matmuls)."""
        return {"router": 2.0 * self.dim * self.num_experts, "experts": 6.0 * self.dim * self.active_width()}


class HMoETransformer(ArchTransformer):
    """The MoE blocks (``moe.every``) get a heterogeneous MoE MLP."""

    def install(self) -> None:
        if not self.moe_cfg.enabled:
            raise ConfigError("model.arch=hmoe needs MoE blocks: set moe.num_experts > 0 and moe.every >= 1")
        mean_width = self.moe_cfg.expert_ffn_dim or self.model_cfg.ffn_dim
        for block in self.layers:
            if block.is_moe:
                block.mlp = HMoELayer(self.model_cfg.dim, self.moe_cfg, self.model_cfg.hmoe, mean_width)


def place_experts(widths: list[int], ep_size: int) -> list[list[int]]:
    """Experts per ep rank with balanced summed widths (FLOPs at uniform routing), not counts.

    Greedy longest-processing-time: experts by decreasing width (ties: lower id first) go to the
    rank with the smallest summed width so far (ties: fewer experts, then lower rank). Each rank's
    list is sorted. Worked example, widths [16, 32, 64, 128], ep 2: 128 -> rank 0, 64 -> rank 1,
    32 -> rank 1, 16 -> rank 1, giving [[3], [0, 1, 2]] (128 vs 112), where count balance would give
    [[0, 1], [2, 3]] (48 vs 192).
    """
    if ep_size < 1 or len(widths) < ep_size:
        raise ValueError(f"cannot place {len(widths)} experts on {ep_size} ep ranks; every rank needs one "
                         "(moe.num_experts >= parallel.ep)")
    loads = [0] * ep_size
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    for e in sorted(range(len(widths)), key=lambda e: (-widths[e], e)):
        empty = [r for r in range(ep_size) if not ranks[r]]
        remaining = len(widths) - sum(map(len, ranks))
        # Keep every rank non-empty: once the experts left only just cover the empty ranks, fill them.
        candidates = empty if len(empty) >= remaining else range(ep_size)
        r = min(candidates, key=lambda r: (loads[r], len(ranks[r]), r))
        loads[r] += widths[e]
        ranks[r].append(e)
    return [sorted(r) for r in ranks]


def imbalance(widths: list[int], placement: list[list[int]]) -> float:
    """max over ranks of summed width / mean over ranks (1.0 is perfect)."""
    loads = [sum(widths[e] for e in r) for r in placement]
    return max(loads) / (sum(loads) / len(loads)) if loads else math.nan
