"""The training loop: micro-batch accumulation, AdamW + cosine schedule, clipping, validation,
metrics, atomic checkpoints and preemption handling.

One optimizer step consumes ``train.global_batch_size`` sequences whatever the number of
ranks: each data-parallel rank runs ``global / (micro * dp)`` micro-batches, and micro-batch m
of rank r holds global rows ``[(m*dp + r)*micro, +micro)``. A single process running the same
config sees the same rows in the same order, which makes it the exact reference of every
parallel layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_dist.config import Config, ConfigError, grad_accum_steps
from moe_dist.config.errors import with_path
from moe_dist.data import GlobalBatchSampler, build_datasets, val_batches
from moe_dist.metrics import (DeviceMeans, ExpertLoadTracker, ThroughputMeter, build_progress,
                              build_sinks)
from moe_dist.metrics.flops import mfu, resolve_peak_tflops, training_flops_per_token
from moe_dist.metrics.host_copy import PendingHostCopy
from moe_dist.metrics.throughput import WindowMark
from moe_dist.metrics.progress import format_step_line
from moe_dist.models.activation_checkpointing import apply_activation_checkpointing
from moe_dist.models.compile import compile_blocks
from moe_dist.models.registry import build_model
from moe_dist.moe.routing import state as routing_state
from moe_dist.train.init_from import initialize_from
from moe_dist.train.memory import GIB, estimate_memory
from moe_dist.train.profiling import StepProfiler
from moe_dist.train.runtime import Runtime
from moe_dist.train.summary import run_summary, schedule_warnings

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 124


@dataclass(frozen=True)
class StagedLogWindow:
    """A logging window whose values are on their way to the host (see ``Trainer.fit``)."""

    step: int
    keys: list[str]
    """Names of the window means, in the order of the first copied tensor."""
    lr: float
    throughput: WindowMark
    """Steps, tokens, paused time and the end of the window on the device timeline."""
    load_widths: list[int] | None
    """Experts per MoE layer when the second copied tensor holds the expert-load counters."""
    copy: PendingHostCopy


@dataclass
class FitResult:
    final_step: int
    last_loss: float | None
    last_val_loss: float | None
    preempted: bool = False
    already_complete: bool = False
    """The run had reached ``train.steps`` before this start: nothing was trained or logged."""


class Trainer:
    """What both engines share: data, model, validation, metrics, the loop and preemption. The
    engine (``train/engines/native.py`` or ``deepspeed.py``) provides parallelism, the step and
    checkpoints."""

    def __init__(self, cfg: Config, run_dir: Path, runtime: Runtime) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rt = runtime
        self._stop_requested = False
        self._install_signal_handlers()  # a preemption signal during setup is honoured too
        self.device = runtime.device
        mesh = runtime.mesh

        self.data = build_datasets(cfg.data, cfg.model.vocab_size) if runtime.is_data_builder else None
        runtime.barrier()  # the first rank fills the cache, the others then read it
        if self.data is None:
            self.data = build_datasets(cfg.data, cfg.model.vocab_size)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.data.vocab_size
        elif cfg.model.vocab_size < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                              f"vocabulary ({self.data.vocab_size}); set model.vocab_size=0 to take it from the data")

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, cfg.moe)  # identical init on every rank (same seed)
        initialize_from(self.model, cfg, self.run_dir)  # model.init_from; a resumed checkpoint overrides it
        if cfg.train.compile:  # before recompute wraps the forwards: see models/compile.py
            compile_blocks(self.model)
        apply_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        self._place_model()
        self._configure_parallelism()

        self.accum_steps = grad_accum_steps(cfg, mesh.dp_size)
        self.sampler = GlobalBatchSampler(len(self.data.train), cfg.train.global_batch_size, cfg.data.seed)
        # train.eval_batches counts micro-batches over all data-parallel ranks, so the
        # validation rows are the same whatever the number of ranks.
        self.val_indices = val_batches(self.data.val, cfg.train.micro_batch_size,
                                       max(1, cfg.train.eval_batches // mesh.dp_size), mesh.dp_rank, mesh.dp_size)
        self.autocast_dtype = runtime.autocast_dtype(cfg.train.dtype)

        self.load_tracker = ExpertLoadTracker.from_model(self.model, reduce_fn=self.plan.sum_over_token_ranks,
                                                         image_every=cfg.log.image_every)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len,
                                                        model=self.model).total
        self.peak_tflops = resolve_peak_tflops(cfg.log.peak_tflops, self.device)
        self.step = 0
        if runtime.is_logging_rank:
            counts = estimate_memory(cfg, mesh.world_size, checkpointing=cfg.train.activation_checkpointing)
            for line in run_summary(cfg, mesh.world_size, counts).splitlines():
                logger.info(line)
            for warning in schedule_warnings(cfg):
                logger.warning(warning)

    # ------------------------------------------------------------------ what each engine provides
    def _place_model(self) -> None:
        """Move the freshly built fp32 host model to the device (before ``_configure_parallelism``)."""
        self.model.to(self.device)

    def _configure_parallelism(self) -> None:
        """Set ``plan``, ``optimizer`` and ``scheduler`` for ``self.model``."""
        raise NotImplementedError

    def train_step(self, means: DeviceMeans) -> None:
        """One optimizer step over ``accum_steps`` micro-batches; adds the step's means."""
        raise NotImplementedError

    def save(self) -> Path:
        """Write a checkpoint of this step atomically; return its directory."""
        raise NotImplementedError

    def maybe_resume(self) -> None:
        """Load the checkpoint ``checkpoint.resume`` selects, if any."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def _batch(self, indices: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (self.data.train if split == "train" else self.data.val).get(indices)
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor):
        with self.rt.autocast(self.autocast_dtype):
            output = self.model(inputs)
        lm_loss = self.plan.cross_entropy(output.logits, targets)
        router_losses = {name: value.float() for name, value in output.losses.items()}
        total = lm_loss + sum(router_losses.values()) if router_losses else lm_loss
        return total, lm_loss, router_losses

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for indices in self.val_indices:
            inputs, targets = self._batch(indices, "val")
            _, lm_loss, _ = self._forward_loss(inputs, targets)
            total += lm_loss.float()
        mean = self.plan.mean_over_dp(total / len(self.val_indices))
        self.model.train()
        return float(mean)

    # ------------------------------------------------------------------ loop
    def _request_stop(self, signum, _frame) -> None:
        logger.warning("received signal %d: checkpointing at the next step boundary", signum)
        self._stop_requested = True

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread (tests)
                signal.signal(sig, self._request_stop)

    def fit(self, on_start: Callable[[int], None] | None = None) -> FitResult:
        """Train from the resumed step to ``train.steps``. ``on_start(step)`` runs on every rank
        once data, model and the resumed checkpoint are in place (the entry point records the
        run there), unless the run is already complete."""
        cfg = self.cfg
        self.maybe_resume()
        self.rt.agree_before_training(self.model, cfg)
        if self.step >= cfg.train.steps:
            return FitResult(self.step, None, None, already_complete=True)
        if on_start is not None:
            on_start(self.step)
        if self.rt.is_logging_rank:  # drop what an interrupted attempt logged past the resumed step (or step 0)
            truncate_metrics(self.run_dir / "metrics.jsonl", after_step=self.step)
        # purge_step: TensorBoard hides what an interrupted attempt logged past the resumed step
        self.metrics = build_sinks(self.run_dir, cfg.log, self.rt.is_logging_rank, run_config=cfg.to_dict(),
                                   purge_step=self.step + 1)
        profiler = StepProfiler.from_config(cfg.train, self.run_dir, self.rt.env.rank, self.device, self.model)
        self.metrics.text("config", f"```\n{cfg.to_yaml()}\n```")
        self.throughput = ThroughputMeter(self.device)
        self.throughput.start()
        means = DeviceMeans()
        staged: StagedLogWindow | None = None
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        last_loss = last_val = None
        preempted = False
        with build_progress(cfg.log, cfg.train.steps, self.step, self.rt.is_logging_rank) as progress:
            text_lines = self.rt.is_logging_rank and not progress.enabled  # no bar (off, or not a terminal)
            while self.step < cfg.train.steps:
                # Every collective of a step (forward, backward, logging, eval, checkpoint) is bounded
                # by the watchdog: a dead or hung rank ends the run with the last split sizes.
                with self.rt.guard(f"training step {self.step + 1}"), profiler.step(self.step + 1):
                    self.train_step(means)
                    self.throughput.step(tokens_per_step)
                    progress.update()
                    done = self.step == cfg.train.steps
                    if self.step % cfg.log.every == 0 or done:
                        # This window's values are read at the next logging step (or below, when
                        # this step evaluates or checkpoints): reading them now would drain the
                        # queue of work the host has launched ahead of the device.
                        finished, staged = staged, self._stage_log_window(means)
                        if finished is not None:
                            last_loss = self._write_log_window(finished, progress, text_lines)
                    evaluate = bool(cfg.train.eval_every) and (self.step % cfg.train.eval_every == 0 or done)
                    stop = self.rt.any_rank(self._stop_requested) if self.step % cfg.log.every == 0 else False
                    checkpoint = done or stop or bool(cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)
                    extra = {}
                    if evaluate:
                        with self.throughput.paused():
                            last_val = self.evaluate()
                        extra["val/loss"] = last_val
                        progress.set_metrics(val_loss=last_val)
                    if staged is not None and (evaluate or checkpoint):
                        finished, staged = staged, None
                        last_loss = self._write_log_window(finished, progress, text_lines,
                                                           extra if finished.step == self.step else {})
                        if finished.step == self.step:
                            extra = {}
                    if extra:
                        self._write_record(self.step, extra, text_lines)
                    if checkpoint:
                        self.save()
                if stop and not done:
                    preempted = True
                    break
        profiler.close()  # a run stopped inside the profiled steps writes what it recorded
        self.metrics.flush()
        self.metrics.close()
        return FitResult(self.step, last_loss, last_val, preempted)

    def _stage_log_window(self, means: DeviceMeans) -> StagedLogWindow:
        """Everything a logging window reports, reduced on the device and on its way to the
        host; no host sync (except routing-state metrics of variable-k routers and dynamic
        capacity, written at once). Every rank calls it at the same steps (collectives)."""
        mark = self.throughput.mark()  # the window ends here on the device timeline
        keys, local = means.pop_on_device(self.device)
        # One collective for the whole window: every rank holds the same keys.
        tensors = [self.plan.mean_over_dp(local)]
        load_widths = None
        if len(self.load_tracker):
            load_counts, load_widths = self.load_tracker.collect_on_device()
            tensors.append(load_counts)
        # Router state (active experts, thresholds, capacity controller); collective on every rank.
        routing_state.write_routing_metrics(self.model, self.metrics, self.step, self.plan.sum_over_token_ranks)
        return StagedLogWindow(step=self.step, keys=keys, lr=self.last_lr, throughput=mark,
                               load_widths=load_widths, copy=PendingHostCopy(tensors))

    def _read_log_window(self, staged: StagedLogWindow, progress) -> tuple[float, dict]:
        """(mean train loss, record) of a staged window; writes its expert-load metrics."""
        host = staged.copy.wait()
        window = dict(zip(staged.keys, host[0].tolist()))
        # The wait above means the device passed the window's mark: its time is known.
        rate = self.throughput.measure_mark(staged.throughput)
        record = dict(window)
        record["train/lr"] = staged.lr
        record["perf/tokens_per_s"] = rate.tokens_per_s
        record["perf/step_time_ms"] = rate.step_time_ms
        if self.device.type == "cuda":  # the allocator's own bookkeeping: no device sync
            record["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
        utilisation = mfu(rate.tokens_per_s, self.flops_per_token, self.peak_tflops, self.rt.mesh.world_size)
        if utilisation is not None:
            record["perf/mfu"] = utilisation
        if staged.load_widths is not None:
            report = self.load_tracker.report_from_host(host[1], staged.load_widths)
            self.load_tracker.write(report, self.metrics, staged.step)
        progress.set_metrics(loss=window.get("train/loss"), tokens_per_s=rate.tokens_per_s)
        return window.get("train/loss"), record

    def _write_log_window(self, staged: StagedLogWindow, progress, text_lines: bool,
                          extra: dict | None = None) -> float:
        """Read a staged window and write its record (plus ``extra``) at its step."""
        loss, record = self._read_log_window(staged, progress)
        self._write_record(staged.step, {**record, **(extra or {})}, text_lines)
        return loss

    def _write_record(self, step: int, record: dict, text_lines: bool) -> None:
        self.metrics.scalars(step, record)
        if text_lines:
            logger.info(format_step_line(step, self.cfg.train.steps, record))


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records a killed run logged past its last checkpoint, so a resumed run's
    metrics.jsonl reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept, dropped = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off when the run was killed mid-write
            dropped.append(line)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= after_step:
            kept.append(line)
    if dropped:
        logger.warning("%s: dropped %d unreadable line(s), cut off when the run was killed: %.80r",
                       path, len(dropped), dropped[0])
    tmp = path.with_suffix(".jsonl.tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)  # atomic: on failure the old file is left as it was
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, path, "cannot rewrite metrics.jsonl") from exc
