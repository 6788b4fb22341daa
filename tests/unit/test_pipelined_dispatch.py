"""Chunked (pipelined) dispatch without processes: the chunk layout arithmetic against the
docstring's worked example and a brute-force reference, the degree-1 pipeline against the plain
dispatch -> experts -> combine, the split-phase all-to-all without a group, the layer's choice
of path, and the config checks of ``moe.dispatch_chunks``.

The multi-rank behaviour (parity, no deadlock) is in tests/distributed/test_dispatch_overlap.py.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.config import ConfigError, MoEConfig, load_config, validate
from moe_dist.distributed import comms
from moe_dist.moe.dispatch.all_to_all import AllToAllDispatcher
from moe_dist.moe.dispatch.pipelined import chunk_counts, chunk_major_order, run_pipelined
from moe_dist.moe.experts import GroupedExperts
from moe_dist.moe.layer import MoELayer


def test_chunk_counts_docstring_example():
    # rank 0 routes [3, 0, 1, 2]; n=2: chunk 0 takes floor(c/2), chunk 1 the rest
    counts = chunk_counts(torch.tensor([3, 0, 1, 2]), 2)
    assert counts[:, 0].tolist() == [1, 0, 0, 1] and counts[:, 1].tolist() == [2, 0, 1, 1]
    # send splits per chunk with P=2, L=2: chunk 0 [1, 1], chunk 1 [2, 2]
    assert counts.view(2, 2, 2).sum(1).t().tolist() == [[1, 1], [2, 2]]


def test_chunk_major_order_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        num_experts = int(torch.randint(1, 6, (), generator=gen))
        tokens_per_expert = torch.randint(0, 8, (num_experts,), generator=gen)
        padding = int(torch.randint(0, 4, (), generator=gen))
        num_rows = int(tokens_per_expert.sum()) + padding
        n = int(torch.randint(1, 6, (), generator=gen))
        counts = chunk_counts(tokens_per_expert, n)
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        want = []
        for j in range(n):
            for e in range(num_experts):
                lo, hi = int(tokens_per_expert[e]) * j // n, int(tokens_per_expert[e]) * (j + 1) // n
                assert int(counts[e, j]) == hi - lo
                want += range(int(starts[e]) + lo, int(starts[e]) + hi)
        want += range(num_rows - padding, num_rows)
        assert chunk_major_order(tokens_per_expert, n, num_rows).tolist() == want


@pytest.mark.parametrize("capacity", [None, 3, 5])
@pytest.mark.parametrize("num_chunks", [1, 2, 3, 7])
def test_degree_one_pipeline_equals_plain_dispatch(capacity, num_chunks):
    """Output and gradients (input, both expert weights) of the pipeline equal the plain path
    (bit-exact with one chunk; chunks re-batch the expert GEMMs, so only the summation order of
    the weight gradients may differ). 7 chunks of capacity 3 leave empty chunks."""
    torch.manual_seed(0)
    num_experts, tokens, top_k, dim = 4, 13, 2, 8
    x = torch.randn(tokens, dim, requires_grad=True)
    indices = torch.randint(0, num_experts, (tokens, top_k))
    valid = torch.rand(tokens, top_k) > 0.2
    weights = torch.rand(tokens, top_k)
    experts = GroupedExperts(num_experts, dim, 16)
    dispatcher = AllToAllDispatcher(num_experts, None, 0, 1, capacity_fn=lambda t, k: capacity)

    results = []
    for pipelined in (True, False):
        x.grad = None
        experts.zero_grad(set_to_none=True)
        if pipelined:
            out, side = run_pipelined(dispatcher, x, indices, valid, weights, experts, num_chunks,
                                      side_work=lambda: x * 2)
            assert torch.equal(side, x * 2)
        else:
            expert_in, counts, handle = dispatcher.dispatch(x, indices, valid)
            out = dispatcher.combine(experts(expert_in, counts), weights, handle)
        (out * torch.arange(dim)).sum().backward()
        results.append((out.detach(), x.grad.clone(), experts.w13.grad.clone(), experts.w2.grad.clone()))
    for got, want in zip(*results):
        if num_chunks == 1:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert dispatcher.host_syncs == (2 if capacity is None else 0)  # one per dispatch, chunked or not


def test_split_phase_all_to_all_without_group_is_identity_with_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    ticket = comms.AllToAllTicket([5], [5], None)
    y = comms.all_to_all_wait(comms.all_to_all_start(x, ticket), ticket)
    (y * 3).sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.full_like(x, 3.0))
    with pytest.raises(ValueError, match="equal splits"):
        comms.AllToAllTicket([2, 3], [3, 2], None)


def test_layer_chunks_only_under_expert_parallelism():
    """One process: dispatch_chunks has nothing to overlap and the layer takes the plain path."""
    layer = MoELayer(8, 16, MoEConfig(num_experts=4, dispatch_chunks=4, num_shared_experts=1))
    x = torch.randn(2, 3, 8)
    assert not layer.dispatches_in_chunks()
    out, _ = layer(x)
    assert out.shape == x.shape


def test_shared_experts_cpu_path_is_bit_identical_with_and_without_overlap():
    """On the CPU with one process the overlap flag changes nothing: same order, same bits."""
    results = []
    for overlap in (True, False):
        torch.manual_seed(3)
        layer = MoELayer(8, 16, MoEConfig(num_experts=4, num_shared_experts=2, overlap_shared_experts=overlap))
        x = torch.randn(2, 5, 8, requires_grad=True)
        out, _ = layer(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_dispatch_chunks_config_checks():
    with pytest.raises(ConfigError, match=r"^moe.dispatch_chunks \(0\) must be >= 1"):
        load_config(None, ["moe.dispatch_chunks=0"])
    validate(load_config(None, ["moe.dispatch_chunks=4", "parallel.ep=2"]), 2)
    with pytest.raises(ConfigError, match=r"^moe.dispatch_chunks \(2\) > 1 overlaps the expert-parallel "
                                          r"all-to-all, but parallel.ep is 1; set moe.dispatch_chunks=1"):
        validate(load_config(None, ["moe.dispatch_chunks=2"]), 2)
    with pytest.raises(ConfigError, match=r"^moe.dispatch_chunks \(2\) > 1 with parallel.etp \(2\) > 1 is not "
                                          r"supported.*set moe.dispatch_chunks=1 or parallel.etp=1"):
        validate(load_config(None, ["moe.dispatch_chunks=2", "parallel.ep=2", "parallel.etp=2"]), 4)
    with pytest.raises(ConfigError, match=r"^moe.dispatch_chunks \(3\) > 1 with model.arch=hmoe: .*"
                                          r"use model.arch=transformer or moe.dispatch_chunks=1"):
        validate(load_config(None, ["moe.dispatch_chunks=3", "parallel.ep=2", "model.arch=hmoe"]), 2)


def test_layer_takes_the_plain_path_under_torch_compile(monkeypatch):
    """The split-phase collectives are eager-only: a compiled layer dispatches unchunked."""
    layer = MoELayer(8, 16, MoEConfig(num_experts=4, dispatch_chunks=2))
    layer.set_dispatcher(AllToAllDispatcher(4, object(), 0, 2))  # a stand-in group: never called
    assert layer.dispatches_in_chunks()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not layer.dispatches_in_chunks()


def test_side_stream_path_computes_the_same_shared_experts(monkeypatch):
    """The side-stream branch (weights viewed on the current stream, SwiGLU written with
    F.linear) gives the same output and parameter gradients, bit for bit, as the module call, and
    the same input gradient up to the order autograd sums its three parts in; the stream itself is
    replaced by an inline call here (CUDA is tested in tests/gpu)."""
    from moe_dist.moe import layer as layer_module

    class Inline:
        def __init__(self, result):
            self.result = result

        def join(self):
            return self.result

    results = []
    for side in (True, False):
        monkeypatch.setattr(layer_module, "can_use_side_stream", lambda x, side=side: side)
        monkeypatch.setattr(layer_module, "start_on_side_stream", lambda fn, x: Inline(fn(x)))
        torch.manual_seed(5)
        layer = MoELayer(8, 16, MoEConfig(num_experts=4, num_shared_experts=2))
        x = torch.randn(2, 5, 8, requires_grad=True)
        out, _ = layer(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad for p in layer.parameters()] + [x.grad])
    for got, want in zip(results[0][:-1], results[1][:-1]):
        assert torch.equal(got, want)
    torch.testing.assert_close(results[0][-1], results[1][-1], rtol=1e-6, atol=1e-7)


def test_exchange_order_overlaps_experts_forward_and_backward(monkeypatch):
    """The issue order docs/parallelism.md gives (dispatch 0, dispatch 1, combine 0, dispatch 2,
    combine 1, combine 2), the experts of chunk j computed while dispatch j+1 is in flight, and in
    backward every gradient exchange in flight across an expert backward except the first
    (combine 2's, which chunk 2's expert backward needs) and the last (dispatch 0's). Degree 1 (no
    group): the exchange is wrapped to log when it starts and when it is waited for."""
    log: list[str] = []
    names = iter(["D0", "D1", "C0", "D2", "C1", "C2"])
    grad_count = iter(range(6))

    class Logged:
        def __init__(self, name):
            self.name = name

        def wait(self):
            log.append(f"wait {self.name}")

    real_start = comms._a2a_start

    def logging_start(out, inp, out_splits, in_splits, group, record, name):
        real_start(out, inp, out_splits, in_splits, group, record, name)
        label = next(names) if "backward" not in name else f"grad{next(grad_count)}"
        log.append(f"start {label}")
        return Logged(label)

    monkeypatch.setattr(comms, "_a2a_start", logging_start)

    class Tag(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, name):
            ctx.name = name
            log.append(f"experts {name}")
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            log.append(f"experts-backward {ctx.name}")
            return grad, None

    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16)
    calls = iter(range(3))
    x = torch.randn(20, 8, requires_grad=True)
    dispatcher = AllToAllDispatcher(4, None, 0, 1)
    out, _ = run_pipelined(dispatcher, x, torch.randint(0, 4, (20, 2)), None, torch.rand(20, 2),
                           lambda rows, counts: experts(Tag.apply(rows, f"chunk{next(calls)}"), counts), 3)
    forward = [e for e in log if e.startswith(("start", "experts"))]
    assert forward == ["start D0", "start D1", "experts chunk0", "start C0", "start D2", "experts chunk1",
                       "start C1", "experts chunk2", "start C2"]
    log.clear()
    out.sum().backward()
    # an expert backward between the start and the wait of every gradient exchange but two
    overlapped = []
    for i, entry in enumerate(log):
        if entry.startswith("start grad"):
            name = entry.split()[1]
            end = log.index(f"wait {name}")
            overlapped.append(any(e.startswith("experts-backward") for e in log[i:end]))
    assert overlapped == [False, True, True, True, True, False], log
