"""Monitoring: metric sinks (TensorBoard, metrics.jsonl, Weights & Biases, null), expert-load
tracking and pictures, FLOPs/MFU, throughput and the progress bar. Names and formulas:
docs/metrics.md."""

from moe_dist.metrics.background import BackgroundSink
from moe_dist.metrics.expert_load import ExpertLoadReport, ExpertLoadTracker, LayerLoad, LoadHistory
from moe_dist.metrics.flops import (FlopsBreakdown, mfu, peak_tflops, resolve_peak_tflops,
                                    training_flops_per_token)
from moe_dist.metrics.heatmap import draw_heatmap, render_heatmap
from moe_dist.metrics.progress import ProgressBar, build_progress
from moe_dist.metrics.sink import (JSONL_KEYS, JsonlSink, MetricsLogger, MetricsSink, NullSink,
                                   TensorBoardSink, build_sinks, read_metrics, to_host_scalars)
from moe_dist.metrics.throughput import DeviceMeans, Throughput, ThroughputMeter
from moe_dist.metrics.wandb_sink import WandbSink

__all__ = [
    "BackgroundSink", "DeviceMeans", "ExpertLoadReport", "ExpertLoadTracker", "FlopsBreakdown", "JSONL_KEYS", "JsonlSink",
    "LayerLoad", "LoadHistory", "MetricsLogger", "MetricsSink", "NullSink", "ProgressBar", "TensorBoardSink",
    "Throughput", "ThroughputMeter", "WandbSink", "build_progress", "build_sinks", "draw_heatmap", "mfu",
    "peak_tflops", "read_metrics", "render_heatmap", "resolve_peak_tflops", "to_host_scalars",
    "training_flops_per_token",
]
