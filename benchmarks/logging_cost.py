"""What the trainer's metrics cost per step: the ~1B MoE training step at ``log.every=1`` (device
means, expert-load statistics, TensorBoard and ``metrics.jsonl`` through the background writer)
against the same step with logging off, in one process.

The step is ``benchmarks/train_step.py``'s (``build_setup``: same model, fused AdamW, fused
cross-entropy) plus gradient clipping at ``train.grad_clip`` = 1.0 through the trainer's
``LocalPlan``, which the trainer runs whatever ``log.every`` is. The logging is the trainer's own
code, called, not re-implemented:

* every step, in both modes: ``DeviceMeans.add`` of the losses and the grad norm (as
  ``NativeTrainer.train_step`` does), and the expert-load counters the MoE layers add to in
  their forward;
* at a logging step (mode ``every1``: every step): ``Trainer._stage_log_window`` and ``_read_log_window`` (``DeviceMeans.pop_on_device``,
  the averaged scalars, ``ThroughputMeter.measure``, ``ExpertLoadTracker.collect``/``write``:
  per-layer scalars and histograms, the load heat-map and the per-layer load-over-time images,
  drawn on the writer thread; the routing-state metrics), then the logged record to the sinks and
  the text line that ``Trainer.fit`` writes when no progress bar is shown (to ``train.log`` in the
  run directory). Sinks: ``build_sinks`` with ``log.tensorboard`` on, i.e. ``metrics.jsonl`` and
  TensorBoard behind one ``BackgroundSink``.

Mode ``off`` skips the logging step. The images (the heat map and the 12 layers' load-over-time
pictures) are drawn at most once per ``log.image_every`` steps (``--image-every``, default the
config's 100); ``--image-every 1`` draws all 13 at every step, as the trainer did before that key
existed, the costly end. The modes alternate in blocks of ``--block`` steps (the order
flips every round, to cancel drift); each step is timed from its start to the next step's start
(CUDA events, so the idle time a host sync leaves on the device counts), the last step of a
logging block up to the end of a ``flush`` of the writer (so work the writer still has queued is
counted, not left to the next block). Reported: median and mean step time per mode, and the
relative cost ``(every1 - off) / off`` of both. On CUDA the record also counts the host syncs of one
logging step under ``torch.cuda.set_sync_debug_mode("warn")``.

The logging step is ``Trainer.fit``'s: it stages the window (the means and the expert-load
counters reduced on the device, their copies to pinned host memory started, an event recorded;
``Trainer._stage_log_window``) and reads the previous window, whose event the device passed one
step ago (``Trainer._read_log_window``). Before that change, four host syncs per logging step
(the means' copy, their round trip through the data-parallel mean, ``ThroughputMeter.measure``'s
``torch.cuda.synchronize`` and the expert-load copy) drained the queue the host had launched
ahead of the device, at every step when ``log.every=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import DeviceClock, count_host_syncs, emit, gpu_name, log, pick_device, sync
from benchmarks.train_step import (FULL, TINY, TrainSetup, add_compile_args, add_optimizer_arg, build_setup,
                                   compile_mode_label, resolve_compile_mode)
from moe_dist.config import Config, LogConfig
from moe_dist.distributed.launch_env import LaunchEnv
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.metrics import DeviceMeans, ExpertLoadTracker, ThroughputMeter, build_progress, build_sinks
from moe_dist.metrics.flops import resolve_peak_tflops
from moe_dist.train import trainer as trainer_module
from moe_dist.train.plan import LocalPlan
from moe_dist.train.runtime import Runtime
from moe_dist.train.trainer import Trainer

GRAD_CLIP = 1.0  # train.grad_clip's default
MODES = ("off", "every1")


class LoggingHarness(Trainer):
    """The trainer's logging state for one process, around a model this benchmark trains.

    ``Trainer.__init__`` builds datasets and a runtime from a full config; the logging window
    reads only the attributes set here, each to what ``Trainer.__init__`` and ``Trainer.fit``
    set them to in a single process. The logging methods themselves are the trainer's, inherited.
    """

    def __init__(self, setup: TrainSetup, device: torch.device, run_dir: Path, log_cfg: LogConfig,
                 total_steps: int) -> None:  # no super().__init__(): see the class docstring
        self.device = device
        self.run_dir = run_dir
        self.model = setup.model
        self.optimizer = setup.optimizer
        self.rt = Runtime(LaunchEnv.single(), ParallelMesh.single(), device)
        self.plan = LocalPlan(setup.model)
        self.load_tracker = ExpertLoadTracker.from_model(setup.model, reduce_fn=self.plan.sum_over_token_ranks,
                                                         image_every=log_cfg.image_every)
        self.flops_per_token = setup.flops_per_token
        self.peak_tflops = resolve_peak_tflops(log_cfg.peak_tflops, device)
        self.step = 0
        self.last_lr = setup.optimizer.param_groups[0]["lr"]
        self.total_steps = total_steps
        self.cfg = Config()  # the text line reads train.steps; the rest of the config is unused here
        self.cfg.train.steps = total_steps
        self.metrics = build_sinks(run_dir, log_cfg, is_logging_rank=True, purge_step=1)
        self.metrics.text("config", "benchmarks/logging_cost.py")
        self.throughput = ThroughputMeter(device)
        self.throughput.start()
        self.progress = build_progress(log_cfg, total_steps, 0, is_logging_rank=True)
        self.text_lines = not self.progress.enabled
        self.staged = None

    def record_step(self, losses, means: DeviceMeans, tokens: int) -> None:
        """What ``NativeTrainer.train_step`` and ``Trainer.fit`` do after every step."""
        means.add({"train/loss": losses.total, "train/lm_loss": losses.lm_loss,
                   **{f"train/{name}": value for name, value in losses.router_losses.items()}})
        means.add({"train/grad_norm": losses.grad_norm})
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        self.throughput.step(tokens)
        self.progress.update()

    def log_step(self, means: DeviceMeans) -> None:
        """``Trainer.fit``'s logging step: stage this window, write the previous one (its record
        to the sinks, its text line)."""
        finished, self.staged = self.staged, self._stage_log_window(means)
        if finished is not None:
            self._write_log_window(finished, self.progress, self.text_lines)

    def finish_logging(self) -> None:
        """Write the last staged window, as ``Trainer.fit`` does at an evaluation or checkpoint."""
        if self.staged is not None:
            finished, self.staged = self.staged, None
            self._write_log_window(finished, self.progress, self.text_lines)


@contextlib.contextmanager
def trainer_log_file(path: Path):
    """The trainer's INFO lines to ``path`` for the run, as ``init_logging`` shows them on rank 0."""
    logger = trainer_module.logger
    handler = logging.FileHandler(path)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def run_block(mode: str, steps: int, setup: TrainSetup, harness: LoggingHarness, means: DeviceMeans,
              marks: DeviceClock, device: torch.device) -> list[float]:
    """Per-step milliseconds of ``steps`` steps in ``mode``."""
    points = []
    for _ in range(steps):
        points.append(marks.mark())
        losses = setup.step()
        harness.record_step(losses, means, setup.tokens_per_step)
        if mode == "every1":
            harness.log_step(means)
    if mode == "every1":
        harness.finish_logging()
        harness.metrics.flush()  # the writer's queued work belongs to this block's steps
    points.append(marks.mark())
    sync(device)
    return [marks.elapsed_ms(a, b) for a, b in zip(points, points[1:])]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model (tests)")
    parser.add_argument("--model", default="moe", choices=["moe", "dense"])
    add_optimizer_arg(parser)
    add_compile_args(parser)
    parser.add_argument("--warmup", type=int, default=None, help="steps per mode before timing")
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks per mode")
    parser.add_argument("--block", type=int, default=8, help="steps per block")
    parser.add_argument("--image-every", type=int, default=LogConfig.image_every,
                        help="log.image_every: fewest steps between two drawings of the load images")
    parser.add_argument("--run-dir", default=None, help="where the metrics go (default: a temporary directory)")
    args = parser.parse_args(argv)
    resolve_compile_mode(args)
    device = pick_device()
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    rounds = args.rounds if args.rounds is not None else (2 if args.tiny else 6)
    block = 2 if args.tiny and args.block == 8 else args.block
    size = TINY if args.tiny else FULL
    base = {"bench": "logging_cost", "model": args.model, "system": "moe_dist" + compile_mode_label(args.compile_mode),
            "compile_mode": args.compile_mode or "eager", "log_every": 1, "tensorboard": True,
            "image_every": args.image_every,
            "block": block, "rounds": rounds, "seq_len": size["seq_len"], "batch": size["batch"],
            "device": gpu_name(device)}
    setup = build_setup(args.model, size, device, args.optimizer, args.compile_mode,
                        clip_grad=lambda model: LocalPlan(model).clip_grad_norm_(GRAD_CLIP),
                        optimizer_state_dtype=args.optimizer_state_dtype)
    log_cfg = LogConfig(every=1, tensorboard=True, progress_bar=False, image_every=args.image_every)
    total_steps = 2 * warmup + 2 * rounds * block + 1
    with contextlib.ExitStack() as stack:
        run_dir = Path(args.run_dir) if args.run_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(trainer_log_file(run_dir / "train.log"))
        harness = LoggingHarness(setup, device, run_dir, log_cfg, total_steps)
        stack.callback(harness.metrics.close)
        means = DeviceMeans()
        marks = DeviceClock(device)
        for mode in MODES:  # compiles, fills the writer's and TensorBoard's first files
            run_block(mode, warmup, setup, harness, means, marks, device)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for index in range(rounds):
            for mode in (MODES if index % 2 == 0 else MODES[::-1]):
                times[mode] += run_block(mode, block, setup, harness, means, marks, device)
        # One more step, its logging under the sync detector (CUDA only).
        harness.record_step(setup.step(), means, setup.tokens_per_step)
        syncs = count_host_syncs(lambda: harness.log_step(means), device, "logging_cost")
        if syncs is None:
            harness.log_step(means)
        harness.finish_logging()
        harness.metrics.close()
        logged_steps = len((run_dir / "metrics.jsonl").read_text().splitlines())
        tb_bytes = sum(f.stat().st_size for f in (run_dir / "tb").glob("events.out.tfevents.*"))
        text_lines = len((run_dir / "train.log").read_text().splitlines())
    results = []
    for mode in MODES:
        record = {**base, "mode": mode, "status": "ok", "steps": len(times[mode]),
                  "median_step_ms": round(statistics.median(times[mode]), 3),
                  "mean_step_ms": round(statistics.fmean(times[mode]), 3)}
        emit(record)
        results.append(record)
    off, on = results
    cost = {**base, "mode": "cost", "status": "ok",
            "relative_cost_pct": round(100 * (on["median_step_ms"] / off["median_step_ms"] - 1), 2),
            "relative_cost_pct_mean": round(100 * (on["mean_step_ms"] / off["mean_step_ms"] - 1), 2),
            "delta_ms": round(on["median_step_ms"] - off["median_step_ms"], 3),
            "host_syncs_per_log_step": syncs, "logged_steps": logged_steps, "text_lines": text_lines,
            "tb_event_bytes": tb_bytes}
    emit(cost)
    results.append(cost)
    log(f"[logging_cost] every1 vs off: {cost['relative_cost_pct']:+.2f}% (median), "
        f"{cost['relative_cost_pct_mean']:+.2f}% (mean), host syncs per logging step: {syncs}")
    return results


if __name__ == "__main__":
    main()
