"""Host syncs of the SwitchHead attention, the Stratified MoE layer and HMoE, counted by CUDA itself.

The architecture study's two slowest rows (docs/architectures.md, "Study") came from host syncs:

* SwitchHead at d_h = 52, whose rows are not 16-byte aligned, took the per-expert loop (one sync
  per grouped GEMM); its widths are now zero-padded into ``torch._grouped_mm``, so a training
  step under bf16 autocast with fp32 parameters and an fp32 residual stream must not sync at all;
* Stratified MoE reads its per-stratum pending counts on the host, now once per pass: a forward
  makes ``passes + 1`` reads (the last one finds no pending token), the backward none.

Both also counted expert load with CUDA ``torch.bincount``, which reads its maximum back to the
host: on an H200 this file's first run (2026-12-07) stopped at such a sync in SwitchHead's
load record (mode "error" raises at the first) and counted 21 in a two-pass Stratified forward
(the 3 documented reads, and 18 from nine ``bincount`` calls, two syncs each). They now count
with ``count_per_expert`` (a scatter-add into a fixed-size buffer).

HMoE (written 2026-12-08, not yet run on a GPU): its 'padded' expert compute is documented as
sync-free and 'by_width' as one read per forward. Before that day it counted with ``bincount``,
copied its expert ids to the device on every call, and sent fp32 rows to the grouped GEMM under
autocast (the per-expert loop): all three synced.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moe_dist.config import MoEConfig, RouterConfig, StratifiedConfig, SwitchHeadConfig  # noqa: E402
from moe_dist.config.model import HMoEConfig  # noqa: E402
from moe_dist.models.hmoe import HMoELayer  # noqa: E402
from moe_dist.models.stratified import StratifiedMoELayer  # noqa: E402
from moe_dist.models.switchhead import SwitchHeadAttention  # noqa: E402
from moe_dist.models.transformer import rotary_tables  # noqa: E402
from test_host_syncs_gpu import assert_syncs, count_syncs  # noqa: E402

DIM, BATCH, SEQ = 512, 4, 256


def _autocast_step(module, x, *extra):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(x, *extra)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()


def test_switchhead_with_unaligned_head_width_trains_without_a_host_sync():
    torch.manual_seed(0)
    cfg = SwitchHeadConfig(n_heads=4, head_dim=52, num_experts=4, top_k=2)
    attention = SwitchHeadAttention(DIM, cfg, default_heads=8).cuda().train()
    cos, sin = (t.cuda() for t in rotary_tables(52, SEQ, 10000.0))
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", requires_grad=True)  # fp32 residual stream
    for _ in range(2):  # warm-ups: Triton compilation, cuBLAS handles, the allocator
        _autocast_step(attention, x, cos, sin)
    assert_syncs(lambda: _autocast_step(attention, x, cos, sin), 0)
    assert attention.w_v.grad is not None and attention.w_v.grad.abs().sum() > 0


@pytest.mark.parametrize("second_expert", ["top2", "sampling"])
def test_stratified_reads_the_host_once_per_pass(second_expert):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, expert_ffn_dim=256, router=RouterConfig(top_k=2, aux_loss_coef=0.01))
    cfg = StratifiedConfig(strata=[4, 4], second_expert=second_expert)
    layer = StratifiedMoELayer(DIM, 1024, moe, cfg, 1e-5).cuda().train()
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", requires_grad=True)
    for _ in range(2):
        _autocast_step(layer, x)
    passes = []
    one_pass = layer._pass
    layer._pass = lambda *args: passes.append(args[1]) or one_pass(*args)
    where = count_syncs(lambda: _autocast_step(layer, x))
    assert passes and len(where) == len(passes) + 1, f"{len(where)} host syncs for passes {passes}: {where}"
    assert all("stratified.py" in w for w in where), where


@pytest.mark.parametrize("gemm, reads", [("padded", 0), ("by_width", 1)])
def test_hmoe_host_reads_per_training_step(gemm, reads):
    """HMoE's expert compute (docs/architectures.md, HMoE): 'padded' runs one grouped GEMM over
    zero-padded experts with no host read; 'by_width' reads the width groups' row counts once
    per forward. Under bf16 autocast with an fp32 residual stream, so the rows must reach
    grouped_mm in bf16 (fp32 rows would take the per-expert loop, which syncs)."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, expert_ffn_dim=256, router=RouterConfig(top_k=2))
    layer = HMoELayer(DIM, moe, HMoEConfig(gemm=gemm, ratio=1.5), mean_width=256).cuda().train()
    assert len(set(layer.widths)) > 1, layer.widths
    for param in layer.parameters():  # the model's init fills them; the bare layer has torch.empty
        torch.nn.init.normal_(param, std=0.02)
    x = torch.randn(BATCH, SEQ, DIM, device="cuda", requires_grad=True)
    for _ in range(2):
        _autocast_step(layer, x)
    if reads == 0:
        assert_syncs(lambda: _autocast_step(layer, x), 0)  # under sync debug mode "error"
    else:  # counted once, then checked for number and place
        where = count_syncs(lambda: _autocast_step(layer, x))
        assert len(where) == reads, f"{gemm}: {len(where)} host syncs, expected {reads}: {where}"
        assert all("hmoe.py" in w for w in where), where
    assert x.grad is not None and x.grad.abs().sum() > 0
