"""Host syncs of an MoE layer under expert tensor parallelism, counted by CUDA.

Rank 0 of a simulated ``ep=2 x etp=2`` world (torch's fake process group in this one process:
its collectives move no data, so the count exchange and the etp row collectives are replaced by
"every rank holds what this rank holds", which keeps every size consistent) runs one forward +
backward under bf16 autocast with fp32 parameters, as ``test_host_syncs_gpu.py`` does for ep:

| policy | syncs | what |
|---|---|---|
| fixed | 0 | nothing, also on a new token count (the etp row-count agreement is a device-side assert) |
| dropless | 2 | the all-to-all's split sizes, and the etp row counts of the uneven gather |

The rows (and their gradients) cross the wire in bf16, and the dispatcher's own ``host_syncs``
counter agrees with CUDA.

Status: written without a GPU run (no device time was left in its session); the same patched
world on the CPU (no sync counting, fp32) gives the counters and shapes above.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.gpu

if __name__ != "__main__" and not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from moe_dist.config import ParallelConfig  # noqa: E402
from test_host_syncs_gpu import BATCH, DIM, SEQ, assert_syncs, build_layer, training_step  # noqa: E402

EP, ETP = 2, 2


@contextlib.contextmanager
def fake_etp_world():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moe_dist.distributed import comms

    saved = {name: getattr(comms, name) for name in
             ("exchange_counts", "all_gather_into_tensor", "_gather_rows", "_reduce_scatter_rows")}
    wire: list[torch.dtype] = []

    def gather_rows(x, rows, group, record, name):
        wire.append(x.dtype)
        return x.repeat(ETP, *([1] * (x.dim() - 1)))

    def reduce_scatter_rows(x, rows, group, record, name):
        wire.append(x.dtype)
        return x.view(ETP, -1, *x.shape[1:]).sum(0)

    def all_gather_into_tensor(out, inp, group, record=None):
        return out.view(-1, *inp.shape).copy_(inp.expand(out.numel() // inp.numel(), *inp.shape)).view_as(out)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=EP * ETP)
    comms.exchange_counts = lambda counts, group, record=None: counts.clone()
    comms.all_gather_into_tensor = all_gather_into_tensor
    comms._gather_rows, comms._reduce_scatter_rows = gather_rows, reduce_scatter_rows
    try:
        yield wire
    finally:
        for name, value in saved.items():
            setattr(comms, name, value)
        dist.destroy_process_group()


def etp_step(policy: str, seq: int = SEQ):
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.models.expert_parallel import apply_ep

    layer = build_layer("softmax_topk", policy, dtype=torch.float32)
    apply_ep(layer, build_mesh(ParallelConfig(dp=EP * ETP, ep=EP, etp=ETP), EP * ETP, "cuda"))

    def step(tokens: int = seq):
        x = torch.randn(BATCH, tokens, DIM, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return training_step(layer, x)

    for _ in range(2):
        step()
    return step, layer


@pytest.mark.parametrize("policy, syncs", [("fixed", 0), ("dropless", 2)])
def test_etp_step_syncs_as_documented(policy, syncs):
    with fake_etp_world() as wire:
        step, layer = etp_step(policy)
        wire.clear()
        before = layer.dispatcher.host_syncs
        assert_syncs(step, syncs)
        assert layer.dispatcher.host_syncs - before == syncs
        assert wire == [torch.bfloat16] * 4, wire  # gather + reduce-scatter, forward and backward
        if policy == "fixed":  # a new token count: agreed over etp (and ep) without a host read
            checks = layer.dispatcher.shape_checks
            assert_syncs(lambda: step(SEQ // 2), 0)
            assert layer.dispatcher.shape_checks == checks + 1


if __name__ == "__main__":
    for policy, syncs in (("fixed", 0), ("dropless", 2)):
        test_etp_step_syncs_as_documented(policy, syncs)
        print(policy, "ok")
