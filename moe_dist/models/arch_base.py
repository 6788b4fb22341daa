"""The shell the research architectures (``model.arch``: switchhead, peer, mh_moe, stratified)
share.

Each one is the decoder LM of :mod:`moe_dist.models.transformer` with some blocks' attention or
MLP swapped for the architecture's module, so the trainer, the checkpoints and the parallel
wrappers see the same ``Transformer`` (``forward`` returns ``ModelOutput(logits, losses)``).
:class:`ArchTransformer` is that shared shell: it builds the plain model, lets the subclass
swap modules in :meth:`ArchTransformer.install`, re-initialises everything from ``model.init_std``
and counts training FLOPs per token part by part (:meth:`flops_per_token`, used for MFU).

Modules that an architecture installs may define ``reset_parameters(std, out_std)`` (called at
init) and ``flops_per_token(seq_len) -> float`` (forward matmul FLOPs of one token).
"""

from __future__ import annotations

from moe_dist.config import ModelConfig, MoEConfig
from moe_dist.metrics.flops import TRAINING_MULTIPLIER, FlopsBreakdown
from moe_dist.models.transformer import Attention, Transformer
from moe_dist.moe.experts import init_std_for_output
from moe_dist.moe.layer import MoELayer, SwiGLU


class ArchTransformer(Transformer):
    """``Transformer`` whose blocks get architecture-specific modules from :meth:`install`."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        self._installed = False
        super().__init__(model_cfg, moe_cfg)
        self.install()
        self._installed = True
        self.reset_parameters()

    def install(self) -> None:
        """Swap modules into ``self.layers`` (subclasses)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not getattr(self, "_installed", False):
            return
        std = self.model_cfg.init_std
        out_std = init_std_for_output(std, self.model_cfg.n_layers)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_arch_parameters"):
                module.reset_arch_parameters(std, out_std)

    # FLOPs ------------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> FlopsBreakdown:
        """Training FLOPs per token (matmuls only, x3 for backward); see metrics/flops.py."""
        if seq_len <= 0:
            raise ValueError(f"seq_len ({seq_len}) must be positive")
        d = self.model_cfg.dim
        parts = {"dense": 0.0, "attention": 0.0, "experts": 0.0, "router": 0.0}
        for block in self.layers:
            attn = block.attention
            if isinstance(attn, Attention):
                parts["attention"] += 2 * 4 * d * d + 2 * 2 * d * (seq_len + 1) / 2
            else:
                for key, value in attn.flops_per_token(seq_len).items():
                    parts[key] += value
            mlp = block.mlp
            if isinstance(mlp, SwiGLU):
                parts["dense"] += 2 * 3 * d * mlp.w1.out_features
            elif hasattr(mlp, "flops_per_token"):
                for key, value in mlp.flops_per_token(seq_len).items():
                    parts[key] += value
            elif isinstance(mlp, MoELayer):
                for key, value in moe_layer_flops(mlp).items():
                    parts[key] += value
            else:  # pragma: no cover - every installed MLP above is covered
                raise TypeError(f"no FLOP count for MLP {type(mlp).__name__}")
        head = 2 * d * self.output.out_features
        m = TRAINING_MULTIPLIER
        return FlopsBreakdown(dense=m * parts["dense"], attention=m * parts["attention"],
                              experts=m * parts["experts"], router=m * parts["router"], head=m * head)


def moe_layer_flops(layer: MoELayer) -> dict[str, float]:
    """Forward FLOPs per token of a plain MoELayer (nominal top_k, shared experts as dense)."""
    dim = layer.experts.dim
    swiglu = 2 * 3 * dim * layer.expert_ffn_dim
    dense = swiglu * layer.cfg.num_shared_experts
    return {"router": 2.0 * dim * layer.num_experts, "experts": float(layer.cfg.router.top_k * swiglu),
            "dense": float(dense)}
