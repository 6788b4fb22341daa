"""Every collective moe_dist calls, in one place; autograd-aware versions for EP and TP/SP.

Conventions:

* ``group=None`` means "degree 1": every function is then the identity (or a local copy), so
  single-process code runs the same calls. This is *not* torch's "None = WORLD": the group is a
  required argument, and a job-wide collective passes :func:`world_group` explicitly.
* Only ``dist.all_to_all_single`` is used for all-to-all: the list form fails on gloo with uneven
  sizes, and ``torch.distributed.nn.functional`` aborts about one run in ten on gloo
  (FEASIBILITY §2). The autograd wrappers here are hand-written ``torch.autograd.Function``s.
* Split sizes are host ``list[int]``. Callers that want split sizes in a timeout message pass a
  :class:`CollectiveRecord` they own (no module state).

Shape legend: ``T`` rows (tokens), ``D`` features, ``E`` experts, ``W`` group size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "avg": dist.ReduceOp.AVG, "product": dist.ReduceOp.PRODUCT}


@dataclass
class CollectiveRecord:
    """The last collective a caller issued, for error messages; owned by the caller."""

    name: str = ""
    """'all_to_all', 'exchange_counts', 'all_reduce', ..."""
    group_ranks: list[int] = field(default_factory=list)
    input_splits: list[int] | None = None
    output_splits: list[int] | None = None
    shape: tuple[int, ...] = ()
    started_at: float = 0.0
    """time.monotonic() when it was issued."""
    count: int = 0
    """Collectives recorded so far."""
    in_flight: bool = False
    """True from issue until the call returned; still True if it raised."""

    def note(self, name: str, group: ProcessGroup | None, shape: tuple[int, ...],
             input_splits: list[int] | None = None, output_splits: list[int] | None = None) -> None:
        self.name, self.shape = name, tuple(shape)
        self.group_ranks = [] if group is None else dist.get_process_group_ranks(group)
        self.input_splits = None if input_splits is None else list(input_splits)
        self.output_splits = None if output_splits is None else list(output_splits)
        self.started_at = time.monotonic()
        self.count += 1
        self.in_flight = True

    def summary(self) -> str:
        if self.count == 0:
            return "no collective recorded"
        state = "unfinished" if self.in_flight else "finished"
        text = f"last collective #{self.count} ({state}): {self.name} over ranks {self.group_ranks}, shape {list(self.shape)}"
        if self.input_splits is not None:
            text += f", input_splits {self.input_splits}, output_splits {self.output_splits}"
        return text


def _done(record: CollectiveRecord | None) -> None:
    if record is not None:
        record.in_flight = False


def _record(record: CollectiveRecord | None, name: str, group: ProcessGroup | None, t: Tensor,
            input_splits: list[int] | None = None, output_splits: list[int] | None = None) -> None:
    if record is not None:
        record.note(name, group, tuple(t.shape), input_splits, output_splits)


def world_group() -> ProcessGroup | None:
    """The whole job as a group: ``dist.group.WORLD``, or None for one process (no group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.group.WORLD


def barrier(group: ProcessGroup | None) -> None:
    """Wait for every rank of `group` (nothing to wait for without one)."""
    if group is not None:
        dist.barrier(group=group)


def destroy() -> None:
    """Tear down every process group (no-op if none was created)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# Plain collectives (no autograd)
# --------------------------------------------------------------------------------------------

def all_reduce(t: Tensor, op: str, group: ProcessGroup | None,
               record: CollectiveRecord | None = None) -> Tensor:
    """In-place all-reduce of `t` over `group` (op: sum, avg, max, min, product); returns `t`."""
    if op not in _OPS:
        raise ValueError(f"all_reduce op {op!r} is not one of {sorted(_OPS)}")
    if group is None:
        return t
    _record(record, f"all_reduce({op})", group, t)
    if op == "avg" and dist.get_backend(group) == "gloo":  # gloo has no AVG
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        _done(record)
        return t.div_(dist.get_world_size(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    _done(record)
    return t


class PendingReduce:
    """Handle of :func:`all_reduce_async`: ``wait()`` blocks until the reduced values are in the
    tensor (and divides them for 'avg' on gloo, which has no AVG)."""

    def __init__(self, t: Tensor, work: Any = None, divisor: int = 1) -> None:
        self.tensor, self._work, self._divisor = t, work, divisor

    def wait(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._divisor != 1:
                self.tensor.div_(self._divisor)
                self._divisor = 1
        return self.tensor


def all_reduce_async(t: Tensor, op: str, group: ProcessGroup | None) -> PendingReduce:
    """Start an in-place all-reduce of `t` and return at once; call ``.wait()`` before reading `t`.

    Used by the gradient reducer to overlap bucket reductions with the rest of backward. Ranks
    must start their async reductions over one group in the same order, as for any collective.
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce_async op {op!r} is not one of {sorted(_OPS)}")
    if group is None:
        return PendingReduce(t)
    if op == "avg" and dist.get_backend(group) == "gloo":  # gloo has no AVG
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)
        return PendingReduce(t, work, dist.get_world_size(group))
    return PendingReduce(t, dist.all_reduce(t, op=_OPS[op], group=group, async_op=True))


def all_gather_into_tensor(out: Tensor, inp: Tensor, group: ProcessGroup | None,
                           record: CollectiveRecord | None = None) -> Tensor:
    """Concatenate every rank's `inp` along dim 0 into `out` ([W * T, ...]); returns `out`."""
    if group is None:
        return out.copy_(inp)
    _record(record, "all_gather", group, inp)
    dist.all_gather_into_tensor(out, inp.contiguous(), group=group)
    _done(record)
    return out


def reduce_scatter_tensor(out: Tensor, inp: Tensor, group: ProcessGroup | None,
                          record: CollectiveRecord | None = None) -> Tensor:
    """Sum `inp` ([W * T, ...]) over ranks and keep this rank's chunk of dim 0 in `out`."""
    if group is None:
        return out.copy_(inp)
    _record(record, "reduce_scatter", group, inp)
    dist.reduce_scatter_tensor(out, inp.contiguous(), group=group)
    _done(record)
    return out


def all_to_all_single(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
                      group: ProcessGroup | None,
                      record: CollectiveRecord | None = None) -> Tensor:
    """Uneven all-to-all along dim 0: rows ``in_splits[j]`` go to rank j, ``out_splits[j]`` come from it."""
    return _a2a(out, inp, out_splits, in_splits, group, record, "all_to_all")


def _a2a(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
         group: ProcessGroup | None, record: CollectiveRecord | None, name: str) -> Tensor:
    _check_splits(inp, out, in_splits, out_splits, group)
    if group is None:
        return out.copy_(inp)
    _record(record, name, group, inp, in_splits, out_splits)
    dist.all_to_all_single(out, inp.contiguous(), output_split_sizes=list(out_splits),
                           input_split_sizes=list(in_splits), group=group)
    _done(record)
    return out


def _check_splits(inp: Tensor, out: Tensor, in_splits: list[int], out_splits: list[int],
                  group: ProcessGroup | None) -> None:
    w = group_size(group)
    if len(in_splits) != w or len(out_splits) != w:
        raise ValueError(f"all_to_all needs one split per rank of the group ({w}); got "
                         f"input_splits {list(in_splits)}, output_splits {list(out_splits)}")
    if sum(in_splits) != inp.shape[0] or sum(out_splits) != out.shape[0]:
        raise ValueError(f"all_to_all splits do not match the rows: input has {inp.shape[0]} rows, "
                         f"input_splits sum to {sum(in_splits)}; output has {out.shape[0]} rows, "
                         f"output_splits sum to {sum(out_splits)}")


def exchange_counts(counts: Tensor, group: ProcessGroup | None,
                    record: CollectiveRecord | None = None) -> Tensor:
    """All-to-all of per-expert token counts, on the counts' device (no host sync).

    `counts` is ``[E]`` int64: how many rows this rank sends to each *global* expert, experts
    laid out contiguously by owner (rank j of the group owns ``E / W`` consecutive experts).
    Returns ``[W * E/W]``: entry ``src * (E/W) + l`` is how many rows rank `src` sends to this
    rank's local expert `l`.
    """
    if counts.dim() != 1:
        raise ValueError(f"exchange_counts expects a 1-D [num_experts] tensor, got shape {list(counts.shape)}")
    w = group_size(group)
    if counts.shape[0] % w != 0:
        raise ValueError(f"exchange_counts: {counts.shape[0]} experts do not split over {w} ranks")
    if group is None:
        return counts.clone()
    out = torch.empty_like(counts)
    _record(record, "exchange_counts", group, counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    _done(record)
    return out


def all_gather_object(obj: Any, group: ProcessGroup | None,
                      record: CollectiveRecord | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in group-rank order (``[obj]`` without a group)."""
    if group is None:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    if record is not None:
        record.note("all_gather_object", group, ())
    dist.all_gather_object(gathered, obj, group=group)
    _done(record)
    return gathered


# --------------------------------------------------------------------------------------------
# Autograd all-to-all (expert parallelism)
# --------------------------------------------------------------------------------------------

class AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all along dim 0.

    Forward sends ``input_splits[j]`` rows to rank j and receives ``output_splits[j]`` from it;
    backward sends the gradient back the same way with the splits swapped. ``group=None`` is
    the identity (then the two split lists must be equal). Zero-row inputs and outputs work.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int],
                group: ProcessGroup | None, record: CollectiveRecord | None = None) -> Tensor:
        ctx.group, ctx.record = group, record
        ctx.output_splits, ctx.input_splits = list(output_splits), list(input_splits)
        if group is None:
            if list(output_splits) != list(input_splits):
                raise ValueError(f"AllToAll without a group needs equal splits; got input_splits "
                                 f"{list(input_splits)}, output_splits {list(output_splits)}")
            return x.clone()  # a new tensor, so callers may modify it in place
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        return all_to_all_single(out, x, ctx.output_splits, ctx.input_splits, group, record)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.group is None:
            return grad_out, None, None, None, None
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        _a2a(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group,
             ctx.record, "all_to_all(backward)")
        return grad_in, None, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int],
               group: ProcessGroup | None, record: CollectiveRecord | None = None) -> Tensor:
    """``AllToAll.apply`` with keyword-friendly arguments."""
    return AllToAll.apply(x, output_splits, input_splits, group, record)


# --------------------------------------------------------------------------------------------
# Split-phase autograd all-to-all (overlap with computation)
# --------------------------------------------------------------------------------------------

class AllToAllTicket:
    """One split-phase all-to-all: what :func:`all_to_all_start` issued and :func:`all_to_all_wait`
    waits for, in forward and (the gradient's exchange, splits swapped) in backward.

    ``output_splits[j]`` rows come from rank j, ``input_splits[j]`` go to it, as in
    :class:`AllToAll`. A ticket serves one start and one wait; make a new one per exchange.
    """

    def __init__(self, output_splits: list[int], input_splits: list[int], group: ProcessGroup | None,
                 record: CollectiveRecord | None = None) -> None:
        if group is None and list(output_splits) != list(input_splits):
            raise ValueError(f"all_to_all_start without a group needs equal splits; got input_splits "
                             f"{list(input_splits)}, output_splits {list(output_splits)}")
        self.output_splits, self.input_splits = list(output_splits), list(input_splits)
        self.group, self.record = group, record
        self.work: Any = None
        """The forward exchange in flight (None once waited for, or without a group)."""
        self.grad_work: Any = None
        """The backward exchange in flight, started by the wait's backward."""
        self.grad_x: Tensor | None = None
        """The receive buffer of the backward exchange: the gradient of the start's input."""


def _a2a_start(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
               group: ProcessGroup | None, record: CollectiveRecord | None, name: str) -> Any:
    """Issue an uneven all-to-all without waiting; returns the work handle (None: no group, done)."""
    _check_splits(inp, out, in_splits, out_splits, group)
    if group is None:
        out.copy_(inp)
        return None
    _record(record, name, group, inp, in_splits, out_splits)
    return dist.all_to_all_single(out, inp, output_split_sizes=list(out_splits),
                                  input_split_sizes=list(in_splits), group=group, async_op=True)


def _a2a_wait(work: Any, record: CollectiveRecord | None) -> None:
    if work is not None:
        work.wait()  # on CUDA: the current stream waits for the exchange (no host sync)
        _done(record)


class _StartAllToAll(torch.autograd.Function):
    """Forward: issue the exchange of `x` and return its receive buffer, not yet filled.
    Backward: wait for the gradient's exchange that :class:`_WaitAllToAll`'s backward issued."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ticket: AllToAllTicket) -> Tensor:
        ctx.ticket = ticket
        out = x.new_empty((sum(ticket.output_splits), *x.shape[1:]))
        # The input stays referenced by the work (gloo) or stashed by the process group (NCCL)
        # until the wait, so it is neither freed nor reused while the exchange reads it.
        ticket.work = _a2a_start(out, x.contiguous(), ticket.output_splits, ticket.input_splits,
                                 ticket.group, ticket.record, "all_to_all(start)")
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        # grad_out is what the wait's backward passed through (it is being sent); the gradient of
        # x is the receive buffer of that exchange.
        ticket = ctx.ticket
        _a2a_wait(ticket.grad_work, ticket.record)
        grad_x, ticket.grad_work, ticket.grad_x = ticket.grad_x, None, None
        return grad_x, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange and pass the filled buffer on. Backward: issue the
    gradient's exchange (splits swapped) into ``ticket.grad_x``, which :class:`_StartAllToAll`'s
    backward returns after waiting for it. Whatever autograd runs in between (other chunks'
    backward) overlaps the exchange."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, ticket: AllToAllTicket) -> Tensor:
        ctx.ticket = ticket
        _a2a_wait(ticket.work, ticket.record)
        ticket.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        ticket = ctx.ticket
        grad_out = grad_out.contiguous()
        ticket.grad_x = grad_out.new_empty((sum(ticket.input_splits), *grad_out.shape[1:]))
        ticket.grad_work = _a2a_start(ticket.grad_x, grad_out, ticket.input_splits, ticket.output_splits,
                                      ticket.group, ticket.record, "all_to_all(start, backward)")
        return grad_out, None  # passed through to the start's backward, which only keeps it alive


def all_to_all_start(x: Tensor, ticket: AllToAllTicket) -> Tensor:
    """Start the differentiable uneven all-to-all of `x` described by `ticket` and return at once.

    The returned buffer is filled only after :func:`all_to_all_wait`; read nothing from it
    before. Every rank must start its exchanges over one group in the same order (as for any
    collective); several may be in flight at once. In backward the roles swap: the wait issues
    the gradient's exchange, the start waits for it, so the gradient exchange overlaps the
    backward of whatever was computed between the two in forward.
    """
    return _StartAllToAll.apply(x, ticket)


def all_to_all_wait(buffer: Tensor, ticket: AllToAllTicket) -> Tensor:
    """Wait for the exchange :func:`all_to_all_start` started; returns the filled buffer."""
    return _WaitAllToAll.apply(buffer, ticket)


# --------------------------------------------------------------------------------------------
# Autograd row all-gather / reduce-scatter, even or uneven (expert tensor parallelism)
# --------------------------------------------------------------------------------------------

def _gather_rows(x: Tensor, rows: list[int] | None, group: ProcessGroup, record: CollectiveRecord | None,
                 name: str) -> Tensor:
    """Every rank's rows of `x` concatenated in group-rank order. ``rows`` None: all ranks hold
    ``x.shape[0]`` rows (one all_gather_into_tensor); else ``rows[j]`` rows on rank j (an
    all_to_all_single that sends this rank's rows to every rank)."""
    w = dist.get_world_size(group)
    if rows is None:
        out = x.new_empty((w * x.shape[0], *x.shape[1:]))
        _record(record, name, group, x)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        _done(record)
        return out
    _check_rows(x, rows, group)
    out = x.new_empty((sum(rows), *x.shape[1:]))
    send = x.unsqueeze(0).expand(w, *x.shape).reshape(w * x.shape[0], *x.shape[1:])
    return _a2a(out, send, rows, [x.shape[0]] * w, group, record, name)


def _reduce_scatter_rows(x: Tensor, rows: list[int] | None, group: ProcessGroup,
                         record: CollectiveRecord | None, name: str) -> Tensor:
    """Sum `x` over the group and keep this rank's rows: block j of dim 0 (``rows[j]`` rows, or
    ``x.shape[0] / W`` each when ``rows`` is None) goes to rank j."""
    w = dist.get_world_size(group)
    if rows is None:
        if x.shape[0] % w != 0:
            raise ValueError(f"reduce_scatter_rows: {x.shape[0]} rows do not split evenly over {w} ranks")
        out = x.new_empty((x.shape[0] // w, *x.shape[1:]))
        _record(record, name, group, x)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        _done(record)
        return out
    if sum(rows) != x.shape[0]:
        raise ValueError(f"reduce_scatter_rows: rows {list(rows)} sum to {sum(rows)}, the input has {x.shape[0]}")
    mine = rows[dist.get_rank(group)]
    partials = x.new_empty((w * mine, *x.shape[1:]))
    _a2a(partials, x, [mine] * w, rows, group, record, name)
    return partials.view(w, mine, *x.shape[1:]).sum(0)


def _check_rows(x: Tensor, rows: list[int], group: ProcessGroup) -> None:
    me = dist.get_rank(group)
    if len(rows) != dist.get_world_size(group) or rows[me] != x.shape[0]:
        raise ValueError(f"rows {list(rows)} must list every rank's row count (this rank, {me}, has {x.shape[0]})")


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: list[int] | None, group: ProcessGroup,
                record: CollectiveRecord | None) -> Tensor:
        ctx.rows, ctx.group, ctx.record, ctx.dtype = rows, group, record, x.dtype
        return _gather_rows(x, rows, group, record, "all_gather_rows")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # The gradient crosses the wire in the forward's dtype: an fp32 gradient from an fp32
        # consumer (e.g. the combine's accumulation) would double the bytes of a bf16 layer.
        return (_reduce_scatter_rows(grad.to(ctx.dtype).contiguous(), ctx.rows, ctx.group, ctx.record,
                                     "all_gather_rows(backward)"), None, None, None)


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: list[int] | None, group: ProcessGroup,
                record: CollectiveRecord | None) -> Tensor:
        ctx.rows, ctx.group, ctx.record, ctx.dtype = rows, group, record, x.dtype
        return _reduce_scatter_rows(x, rows, group, record, "reduce_scatter_rows")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (_gather_rows(grad.to(ctx.dtype).contiguous(), ctx.rows, ctx.group, ctx.record,
                             "reduce_scatter_rows(backward)"), None, None, None)


def all_gather_rows(x: Tensor, rows: list[int] | None, group: ProcessGroup | None,
                    record: CollectiveRecord | None = None) -> Tensor:
    """Differentiable all-gather along dim 0: every rank gets all ranks' rows, in group-rank order.

    ``rows`` is None when every rank holds the same number of rows (all_gather_into_tensor),
    else the host row count of every rank of the group (uneven: all_to_all_single). Backward is
    :func:`reduce_scatter_rows` of the gradient: each rank's rows receive the sum of every rank's
    gradient for them. ``group=None`` is the identity.
    """
    return x if group is None else _GatherRows.apply(x, rows, group, record)


def reduce_scatter_rows(x: Tensor, rows: list[int] | None, group: ProcessGroup | None,
                        record: CollectiveRecord | None = None) -> Tensor:
    """Differentiable reduce-scatter along dim 0, the inverse layout of :func:`all_gather_rows`:
    `x` holds every rank's rows in group-rank order; each rank gets the sum over the group of
    its own block. Backward all-gathers the gradient. ``group=None`` is the identity."""
    return x if group is None else _ReduceScatterRows.apply(x, rows, group, record)


# --------------------------------------------------------------------------------------------
# Autograd collectives for tensor / sequence parallelism
# --------------------------------------------------------------------------------------------

def _gather_dim(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    w = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((w * moved.shape[0], *moved.shape[1:]))
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def _chunk_dim(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    w, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % w != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split evenly over {w} ranks")
    return x.chunk(w, dim=dim)[r].contiguous()


def _reduce_scatter_dim(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    w = dist.get_world_size(group)
    if x.shape[dim] % w != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split evenly over {w} ranks")
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // w, *moved.shape[1:]))
    dist.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _all_reduce_copy(x: Tensor, group: ProcessGroup) -> Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


class _AllReduceForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _AllReduceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce_copy(grad, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce_copy(grad, ctx.group), None


class _GatherSplit(torch.autograd.Function):
    """Forward all-gather along dim; backward keeps this rank's chunk (or reduce-scatters)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: ProcessGroup, reduce_grad: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.reduce_grad:
            return _reduce_scatter_dim(grad, ctx.dim, ctx.group), None, None, None
        return _chunk_dim(grad, ctx.dim, ctx.group), None, None, None


class _SplitGather(torch.autograd.Function):
    """Forward keeps this rank's chunk along dim; backward all-gathers."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _chunk_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _gather_dim(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterGather(torch.autograd.Function):
    """Forward reduce-scatter along dim; backward all-gathers."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _gather_dim(grad, ctx.dim, ctx.group), None, None


def all_reduce_forward(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum partial results over the TP group (forward); gradient passes through unchanged.

    Megatron's "reduce from tensor-parallel region": after a row-parallel linear.
    """
    return x if group is None else _AllReduceForward.apply(x, group)


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum ``x`` over the group, autograd-correct when every rank computes the same loss from the
    sum: the backward sums the gradients too (``torch.distributed.nn.functional.all_reduce``).
    Used for batch statistics that are global over the data-parallel ranks."""
    return x if group is None else _AllReduceSum.apply(x, group)


def all_reduce_backward(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Identity forward; all-reduce the gradient (Megatron's "copy to tensor-parallel region"):
    before a column-parallel linear whose input is replicated over the TP group."""
    return x if group is None else _AllReduceBackward.apply(x, group)


def gather_forward_split_backward(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """All-gather along `dim`; backward keeps this rank's chunk of the (replicated) gradient.

    Use when everything after the gather is computed identically on every rank (e.g. gathering
    column-parallel logits)."""
    return x if group is None else _GatherSplit.apply(x, dim, group, False)


def gather_forward_reduce_scatter_backward(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """All-gather along `dim`; backward reduce-scatters (sums every rank's partial gradient).

    Sequence parallelism: gather the sequence before a column-parallel linear, whose input
    gradient is partial on each TP rank."""
    return x if group is None else _GatherSplit.apply(x, dim, group, True)


def split_forward_gather_backward(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Keep this rank's chunk along `dim`; backward all-gathers (scatter into SP region)."""
    return x if group is None else _SplitGather.apply(x, dim, group)


def reduce_scatter_forward_gather_backward(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Sum partial results over the group and keep this rank's chunk along `dim`; backward
    all-gathers. Sequence parallelism: after a row-parallel linear."""
    return x if group is None else _ReduceScatterGather.apply(x, dim, group)
