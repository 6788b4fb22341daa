"""Optimizer offload for the native engine (``train.offload_optimizer``, one process).

Where each byte of a parameter lives (the ZeRO-Offload / Megatron "main grad" layout):

===========================  ======  =====================================================
tensor                       bytes   where
===========================  ======  =====================================================
compute copy of the weight   2       device, bf16 (the module's parameter; fp32 on a CPU run)
gradient accumulation        4       device, fp32 ("main grad"), one flat buffer
master weight                4       host, fp32: the tensor the model was built with
AdamW exp_avg, exp_avg_sq    8       host, fp32
===========================  ======  =====================================================

The model is built in fp32 on the host; those parameters become the masters (no copy) and the
module gets a device copy in the compute dtype, a view into one flat device buffer. Each compute
parameter's ``register_post_accumulate_grad_hook`` adds its gradient into its slice of the fp32
main-grad buffer and frees it, so every accumulated micro-batch is summed in fp32 and only one
parameter's low-precision gradient is alive at a time. Embedding lookups are cast to fp32, so the
residual stream stays fp32 as it is with fp32 weights under autocast.

The step (:meth:`OffloadedAdamW.step`), after :meth:`~OffloadedAdamW.clip_grad_norm_` has
scaled the main grads on the device (one norm kernel, no host sync):

1. the flat index space is cut into chunks of whole parameters (``chunk_numel``); a side stream
   copies chunk i's gradients into one of two pinned host buffers, event per chunk;
2. the host waits for chunk i, points the masters' ``.grad`` at the pinned buffer and runs torch's
   AdamW (fused on CPU) on that chunk's masters only (``AdamW.step`` skips parameters without a
   gradient, so each parameter is stepped once per optimizer step);
3. it casts the updated masters into a pinned compute-dtype buffer and a second side stream
   copies them into the flat device buffer;

while the host steps chunk i, chunk i+1's gradients and chunk i-1's weights can be in flight
(each pinned buffer is reused two chunks later, once its copy has finished). The compute stream
waits for both side streams before the next forward.

Checkpoints hold the masters and moments (:meth:`OffloadedAdamW.masters_in_model` puts the
masters back into the module for the save and the load), in the same DCP format as every other
native layout: an offloaded run resumes without offload and the other way round. The learning
rate schedule drives this optimizer's ``param_groups`` like any torch optimizer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_dist.config import TrainConfig
from moe_dist.train.optim import param_groups
from moe_dist.train.plan import LocalPlan

DEFAULT_CHUNK_NUMEL = 1 << 26
"""Elements per host step chunk (64M: 256 MiB of fp32 gradients); a larger parameter is its own
chunk. Two chunks of gradients and two of weights are pinned on the host."""

ALIGN_ELEMENTS = 64
"""Each parameter starts at a multiple of this many elements of the flat buffers (128 bytes in
bf16): kernels such as ``torch._grouped_mm`` need 16-byte aligned weights. The gaps stay zero
in the gradient buffer."""


def fused_cpu_adamw_available() -> bool:
    """torch >= 2.4 has a fused AdamW kernel for CPU tensors."""
    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.zeros(1)
    try:
        torch.optim.AdamW([param], fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class _Chunk:
    start: int
    end: int
    members: tuple[int, ...]
    """Indices into ``OffloadedAdamW.masters`` of the parameters in [start, end)."""


def _plan_chunks(sizes: list[int], chunk_numel: int) -> list[_Chunk]:
    chunks, members, start, offset = [], [], 0, 0
    for index, size in enumerate(sizes):
        if members and offset + size - start > chunk_numel:
            chunks.append(_Chunk(start, offset, tuple(members)))
            members, start = [], offset
        members.append(index)
        offset += size
    if members:
        chunks.append(_Chunk(start, offset, tuple(members)))
    return chunks


def _parameter_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Every (module, local name, parameter) registration, tied parameters once per module."""
    return [(module, name, param) for module in model.modules(remove_duplicate=False)
            for name, param in module._parameters.items() if param is not None]


class OffloadedAdamW(torch.optim.AdamW):
    """AdamW whose fp32 masters and moments live in host memory; the model computes with a
    device copy in ``compute_dtype`` (see the module docstring).

    ``model`` must be the freshly built fp32 host model; it is moved in place: its trainable
    parameters are replaced by device copies, its buffers and frozen parameters are moved.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 compute_dtype: torch.dtype = torch.bfloat16, chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                 fused: bool | None = None) -> None:
        groups = param_groups(model, cfg.weight_decay)
        masters = [p for group in groups for p in group["params"]]
        for master in masters:
            if master.device.type != "cpu" or master.dtype != torch.float32:
                raise ValueError(f"OffloadedAdamW needs the fp32 host model (masters are its tensors); got a "
                                 f"{master.dtype} parameter on {master.device}")
        fused = fused_cpu_adamw_available() if fused is None else fused
        super().__init__(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay,
                         fused=fused or None, foreach=None if fused else False)
        self.masters = masters
        self.device = device
        self.compute_dtype = compute_dtype
        self.cuda = device.type == "cuda"
        sizes = [-(-m.numel() // ALIGN_ELEMENTS) * ALIGN_ELEMENTS for m in masters]  # padded
        self.offsets = [0] * len(sizes)
        for i in range(1, len(sizes)):
            self.offsets[i] = self.offsets[i - 1] + sizes[i - 1]
        total = sum(sizes)
        self.chunks = _plan_chunks(sizes, chunk_numel)
        self.flat_params = torch.empty(total, dtype=compute_dtype, device=device)
        self.main_grads = torch.zeros(total, dtype=torch.float32, device=device)
        self.compute_params: list[nn.Parameter] = []
        for master, offset in zip(masters, self.offsets):
            view = self.flat_params[offset:offset + master.numel()].view(master.shape)
            compute = nn.Parameter(view, requires_grad=True)
            compute.__dict__.update(master.__dict__)  # the tags (expert, tp shard) travel with the weight
            grad_slice = self.main_grads[offset:offset + master.numel()].view(master.shape)
            compute.register_post_accumulate_grad_hook(_accumulate_into(grad_slice))
            self.compute_params.append(compute)
        self._swap_slots(model, {id(m): c for m, c in zip(masters, self.compute_params)})
        self.model = model
        _move_rest(model, device)
        if compute_dtype != torch.float32:
            _keep_fp32_residual_stream(model)
        largest = max((c.end - c.start for c in self.chunks), default=0)
        # two pinned buffers each way on CUDA: chunk i's and chunk i+1's copies (none on the host)
        buffers = 2 if self.cuda else 0
        self._grad_host = [torch.empty(largest, dtype=torch.float32, pin_memory=True) for _ in range(buffers)]
        self._weight_host = [torch.zeros(largest, dtype=compute_dtype, pin_memory=True) for _ in range(buffers)]
        self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device)) if self.cuda else None
        self.copy_masters_to_device()

    # ------------------------------------------------------------------ module slots
    def _swap_slots(self, model: nn.Module, replace: dict[int, nn.Parameter]) -> None:
        for module, name, param in _parameter_slots(model):
            if id(param) in replace:
                module._parameters[name] = replace[id(param)]

    @contextlib.contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """The host masters are the module's parameters inside (what a checkpoint saves and loads,
        keyed like this optimizer's state); the device copies again after."""
        self._swap_slots(self.model, {id(c): m for c, m in zip(self.compute_params, self.masters)})
        try:
            yield
        finally:
            self._swap_slots(self.model, {id(m): c for m, c in zip(self.masters, self.compute_params)})

    def after_load(self) -> None:
        """After a checkpoint load filled the masters and moments: refresh the device copies. (The
        loader keeps this optimizer's kernel choice: distributed/checkpoint.py IMPLEMENTATION_KEYS.)"""
        self.copy_masters_to_device()

    @torch.no_grad()
    def copy_masters_to_device(self) -> None:
        for chunk in self.chunks:
            self.flat_params[chunk.start:chunk.end].copy_(self._cat_masters(chunk, None))

    def _cat_masters(self, chunk: _Chunk, out: torch.Tensor | None) -> torch.Tensor:
        """The chunk's masters, flat, cast to the compute dtype (into ``out`` when given)."""
        if out is None:
            out = torch.zeros(chunk.end - chunk.start, dtype=self.compute_dtype)
        for index in chunk.members:
            offset = self.offsets[index] - chunk.start
            master = self.masters[index]
            out[offset:offset + master.numel()].copy_(master.detach().view(-1))
        return out

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main_grads.zero_()
        for param in self.compute_params:
            param.grad = None
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of all main grads (a device tensor, no host sync)."""
        return torch.linalg.vector_norm(self.main_grads, 2)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """:meth:`grad_norm`, then the main grads scaled so it is at most ``max_norm`` (torch's
        rule: ``max_norm / (norm + 1e-6)``, capped at 1)."""
        norm = self.grad_norm()
        if max_norm != float("inf"):
            self.main_grads.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch's signature
        assert closure is None, "OffloadedAdamW.step takes no closure"
        if not self.cuda:  # the device is the host: the main grads are host tensors already
            for chunk in self.chunks:
                self._step_chunk(chunk, self.main_grads)
                self.flat_params[chunk.start:chunk.end].copy_(self._cat_masters(chunk, None))
            return None
        compute = torch.cuda.current_stream(self.device)
        to_host, to_device = self._streams
        to_host.wait_stream(compute)  # the clipped main grads are final
        to_device.wait_stream(compute)  # backward has read the weights the copies overwrite
        grads_ready: list[torch.cuda.Event] = []
        weights_sent: list[torch.cuda.Event] = []

        def send_grads(i: int) -> None:
            chunk = self.chunks[i]
            with torch.cuda.stream(to_host):
                self._grad_host[i % 2][:chunk.end - chunk.start].copy_(self.main_grads[chunk.start:chunk.end],
                                                                        non_blocking=True)
                event = torch.cuda.Event()
                event.record(to_host)
            grads_ready.append(event)

        for i in range(min(2, len(self.chunks))):
            send_grads(i)
        for i, chunk in enumerate(self.chunks):
            grads_ready[i].synchronize()
            host_grads = self._grad_host[i % 2]
            self._step_chunk(chunk, host_grads, base=chunk.start)
            if i + 2 < len(self.chunks):
                send_grads(i + 2)  # its pinned buffer is free: chunk i's step has read it
            if i >= 2:
                weights_sent[i - 2].synchronize()  # that pinned buffer's copy to the device is done
            staged = self._cat_masters(chunk, self._weight_host[i % 2])
            with torch.cuda.stream(to_device):
                self.flat_params[chunk.start:chunk.end].copy_(staged[:chunk.end - chunk.start], non_blocking=True)
                event = torch.cuda.Event()
                event.record(to_device)
            weights_sent.append(event)
        compute.wait_stream(to_host)  # the next zero_grad writes the buffer the copies read
        compute.wait_stream(to_device)  # the next forward reads the new weights
        return None

    def _step_chunk(self, chunk: _Chunk, grads: torch.Tensor, base: int = 0) -> None:
        """AdamW on the chunk's masters, their gradients read from ``grads`` (flat, offset ``base``)."""
        members = [self.masters[i] for i in chunk.members]
        for index, master in zip(chunk.members, members):
            offset = self.offsets[index] - base
            master.grad = grads[offset:offset + master.numel()].view(master.shape)
        super().step()
        for master in members:
            master.grad = None


def _accumulate_into(main_grad: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        main_grad.add_(param.grad)
        param.grad = None
    return hook


def _keep_fp32_residual_stream(model: nn.Module) -> None:
    """Embedding lookups return fp32, as they do from fp32 weights under autocast: the residual
    stream starts at the embedding's dtype and stays fp32 without offload (the memory estimate
    counts it so), so it does with a bf16 table too."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(lambda _module, _inputs, output: output.float())


def _move_rest(model: nn.Module, device: torch.device) -> None:
    """Buffers and frozen parameters (not the optimizer's) to the device, in their own dtype."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
        for name, param in module._parameters.items():
            if param is not None and param.device != device and not param.requires_grad:
                module._parameters[name] = nn.Parameter(param.to(device), requires_grad=False)


class OffloadPlan(LocalPlan):
    """One process with :class:`OffloadedAdamW`: the norm and clipping of its device gradient
    buffer, and checkpoints of its host masters and moments (the same DCP files as LocalPlan's)."""

    def __init__(self, model: nn.Module, optimizer: OffloadedAdamW) -> None:
        super().__init__(model)
        self.optimizer = optimizer

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.optimizer.clip_grad_norm_(max_norm)

    def grad_norm(self) -> torch.Tensor:
        return self.optimizer.grad_norm()  # the main grads: the compute parameters hold none

    def save_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer) -> None:
        with self.optimizer.masters_in_model():
            super().save_model_and_optimizer(directory, model, optimizer)

    def load_model_and_optimizer(self, directory: Path, model: nn.Module, optimizer) -> None:
        with self.optimizer.masters_in_model():
            super().load_model_and_optimizer(directory, model, optimizer)
        self.optimizer.after_load()
