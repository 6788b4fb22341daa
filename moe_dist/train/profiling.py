"""``train.profile_steps``: a torch.profiler trace of chosen optimizer steps, in the run directory.

The trainer wraps every optimizer step (forward, backward, optimizer, and the logging, evaluation
and checkpoint work of that step) in :meth:`StepProfiler.step`. Outside the asked range, and on
ranks that do not profile, that costs one comparison. Inside it:

  1. at the first asked step the profiler starts (CPU ops, plus CUDA kernels on a GPU, with input
     shapes), and a forward pre/post hook on every ``moe_dist`` module labels its forward with its
     module path (``layers.3.mlp.experts [GroupedExperts]``), so the MoE parts of each block can
     be found by name;
  2. each step runs inside ``ProfilerStep#<step>``, torch's own step marker, numbered by the
     optimizer step (1-based, the number the logs and metrics use);
  3. after the last asked step the hooks are removed, the profiler stops and writes
     ``<run_dir>/profile/rank<r>_steps<first>-<last>.pt.trace.json``, a Chrome trace that Perfetto,
     ``chrome://tracing`` and TensorBoard's profiler plugin open.

A run resumed inside the range traces the steps it still runs (the file name says which); a run
stopped inside it (preemption) writes what it recorded when the trainer calls :meth:`close`.
How to read the MoE kernels in the trace: docs/guide/monitoring.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from moe_dist.config.errors import with_path
from moe_dist.config.run import TrainConfig, parse_profile_steps

logger = logging.getLogger(__name__)

PROFILE_SUBDIR = "profile"
STEP_MARKER = "ProfilerStep#"  # torch.profiler's own name for a step range


def trace_path(trace_dir: Path, rank: int, first: int, last: int) -> Path:
    """Where rank ``rank`` writes the trace of optimizer steps ``first``..``last``."""
    return Path(trace_dir) / f"rank{rank}_steps{first}-{last}.pt.trace.json"


class StepProfiler:
    """Profiles optimizer steps ``first``..``last`` (both included) on this rank, or none."""

    def __init__(self, first: int, last: int, trace_dir: Path, rank: int, device: torch.device,
                 model: nn.Module | None = None, enabled: bool = True) -> None:
        self.first, self.last = first, last
        self.trace_dir = Path(trace_dir)
        self.rank = rank
        self.device = device
        self.model = model
        self.enabled = enabled and first > 0
        self.written: Path | None = None
        self._profiler: torch.profiler.profile | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._recorded: list[int] = []

    @classmethod
    def from_config(cls, train_cfg: TrainConfig, run_dir: Path, rank: int, device: torch.device,
                    model: nn.Module | None = None) -> StepProfiler:
        first, last = parse_profile_steps(train_cfg.profile_steps)
        return cls(first, last, Path(run_dir) / PROFILE_SUBDIR, rank, device, model,
                   enabled=rank == 0 or train_cfg.profile_all_ranks)

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap the work of optimizer step ``step`` (1-based)."""
        if not self.enabled or not self.first <= step <= self.last:
            yield
            return
        if self._profiler is None:
            self._start()
        with torch.profiler.record_function(f"{STEP_MARKER}{step}"):
            yield
        self._recorded.append(step)
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop a running trace and write it (a no-op when none runs)."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        profiler.stop()
        if not self._recorded:  # stopped before the first asked step finished
            return
        path = trace_path(self.trace_dir, self.rank, self._recorded[0], self._recorded[-1])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(path))
        except OSError as exc:
            raise with_path(exc, path, "cannot write the profiler trace") from exc
        self.written = path
        logger.info("profiler trace of steps %d-%d written to %s (open it in Perfetto or chrome://tracing)",
                    self._recorded[0], self._recorded[-1], path)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        if self.model is not None:
            self._hooks = label_modules(self.model)
        self._profiler.start()


def label_modules(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Label the forward of every ``moe_dist`` module with its path, as a profiler range.

    Torch's own modules (``nn.Linear``, wrappers) are left out so that the trace stays readable;
    a recomputed forward (activation checkpointing) is labelled again, inside the backward. The
    ranges of one module are kept on a stack of its own, so recursion and the backward thread's
    recomputation nest correctly. Returns the hook handles; remove them to stop labelling.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    for name, module in model.named_modules():
        if not name or not type(module).__module__.startswith("moe_dist."):
            continue
        label = f"{name} [{type(module).__name__}]"
        open_ranges: list[torch.profiler.record_function] = []

        def enter(_module, _args, label=label, open_ranges=open_ranges):
            scope = torch.profiler.record_function(label)
            scope.__enter__()
            open_ranges.append(scope)

        def leave(_module, _args, _output, open_ranges=open_ranges):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    return handles
