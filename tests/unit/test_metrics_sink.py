"""Metric sinks: TensorBoard tags read back with TensorBoard's own reader, metrics.jsonl lines."""

from __future__ import annotations

import errno
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_dist.metrics import (BackgroundSink, JsonlSink, MetricsLogger, NullSink, TensorBoardSink,
                              build_progress, build_sinks, read_metrics, to_host_scalars)

LOG_CFG = SimpleNamespace(tensorboard=True, progress_bar=True)


def _read_tb(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0,
                                                        "tensors": 0})
    acc.Reload()
    return acc


def test_logging_rank_writes_tensorboard_and_jsonl(tmp_path):
    logger = build_sinks(tmp_path, LOG_CFG, is_logging_rank=True)
    assert logger.enabled
    logger.text("config", "model:\n  dim: 8")
    for step in (10, 20):
        logger.scalars(step, {"train/loss": torch.tensor(3.0 / step), "train/lr": 1e-3 * step,
                              "perf/tokens_per_s": 500.0, "moe/layer_1/imbalance": 1.5})
        logger.histogram(step, "moe/layer_1/load", np.array([0.5, 0.25, 0.25, 0.0]))
        logger.image(step, "moe/load_heatmap", np.zeros((3, 4, 6), dtype=np.uint8))
    logger.scalars(20, {"val/loss": 0.25})  # validation at a logging step joins that line
    logger.flush()
    logger.close()

    acc = _read_tb(tmp_path / "tb")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "perf/tokens_per_s", "val/loss", "moe/layer_1/imbalance"} <= set(tags["scalars"])
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in losses] == [10, 20]
    assert losses[0][1] == pytest.approx(0.3) and losses[1][1] == pytest.approx(0.15)
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(20, 0.25)]
    histo = acc.Histograms("moe/layer_1/load")
    assert [h.step for h in histo] == [10, 20]
    assert histo[0].histogram_value.num == 4
    assert histo[0].histogram_value.sum == pytest.approx(1.0)
    images = acc.Images("moe/load_heatmap")
    assert [(i.step, i.width, i.height) for i in images] == [(10, 6, 4), (20, 6, 4)]
    assert "config/text_summary" in tags["tensors"]

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [10, 20]
    assert records[0] == {"step": 10, "loss": pytest.approx(0.3), "lr": pytest.approx(0.01),
                          "tokens_per_s": 500.0, "moe/layer_1/imbalance": 1.5}
    assert records[1]["val_loss"] == 0.25 and records[1]["loss"] == pytest.approx(0.15)


def test_non_logging_rank_writes_nothing(tmp_path):
    logger = build_sinks(tmp_path / "run", LOG_CFG, is_logging_rank=False)
    assert not logger.enabled
    assert isinstance(logger.sinks[0], NullSink)
    logger.scalars(1, {"train/loss": 1.0})
    logger.histogram(1, "h", np.ones(3))
    logger.image(1, "i", np.zeros((3, 2, 2)))
    logger.text("t", "x")
    logger.flush()
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_can_be_disabled(tmp_path):
    logger = build_sinks(tmp_path, SimpleNamespace(tensorboard=False, progress_bar=False), True)
    logger.scalars(1, {"train/loss": 2.0})
    logger.close()
    assert not (tmp_path / "tb").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == {1: {"loss": 2.0}}


def test_jsonl_nonfinite_is_null_and_read_metrics_merges(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.scalars(5, {"train/loss": float("nan"), "train/grad_norm": math.inf})
    sink.flush()
    sink.scalars(5, {"val/loss": 1.25})  # arrives after the flush: second line, same step
    sink.scalars(6, {"train/loss": 1.0})
    sink.close()
    assert len(path.read_text().splitlines()) == 3
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 5, "loss": None, "grad_norm": None}
    # A resumed run appends step 6 again, and a kill cut the last line in half.
    with path.open("a") as handle:
        handle.write(json.dumps({"step": 6, "loss": 0.5}) + "\n" + '{"step": 7, "lo')
    assert read_metrics(path) == {5: {"loss": None, "grad_norm": None, "val_loss": 1.25},
                                  6: {"loss": 0.5}}


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_to_host_scalars_mixes_numbers_and_tensors_in_order():
    values = {"a": 1, "b": torch.tensor(2.5), "c": torch.tensor([4.0]), "d": 0.5}
    assert to_host_scalars(values) == {"a": 1.0, "b": 2.5, "c": 4.0, "d": 0.5}
    assert list(to_host_scalars(values)) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"'v' must be a scalar.*\(2,\)"):
        to_host_scalars({"v": torch.ones(2)})


def test_image_shape_is_checked(tmp_path):
    logger = MetricsLogger([JsonlSink(tmp_path / "metrics.jsonl")])
    with pytest.raises(ValueError, match=r"'moe/load_heatmap' must be CHW"):
        logger.image(1, "moe/load_heatmap", np.zeros((4, 6)))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_logging_rank():
    out = _Terminal()  # the bar is drawn on terminals only
    bar = build_progress(LOG_CFG, total_steps=10, start_step=2, is_logging_rank=True, file=out)
    bar.set_metrics(loss=1.2345, tokens_per_s=12_500.0)
    bar.update(3)
    bar.close()
    text = out.getvalue()
    assert "5/10" in text and "loss=1.2345" in text and "tok/s=12.50k" in text

    silent = _Terminal()
    for cfg, rank_logs in ((LOG_CFG, False), (SimpleNamespace(progress_bar=False), True)):
        bar = build_progress(cfg, total_steps=10, start_step=0, is_logging_rank=rank_logs, file=silent)
        assert not bar.enabled
        bar.update()
        bar.set_metrics(loss=1.0)
        bar.write("hello")
        bar.close()
    assert silent.getvalue() == ""


def test_finished_steps_reach_the_file_without_flush(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.scalars(1, {"train/loss": 2.0})
    assert path.read_text() == ""          # step 1 may still get more scalars
    sink.scalars(2, {"train/loss": 1.5})   # step 1 is finished: written and on disk
    assert read_metrics(path) == {1: {"loss": 2.0}}
    sink.close()
    assert read_metrics(path) == {1: {"loss": 2.0}, 2: {"loss": 1.5}}


class _Recorder(NullSink):
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def scalars(self, step, values):
        if self.fail_on in values:
            raise OSError("disk full")
        self.calls.append(("scalars", step, dict(values)))

    def histogram(self, step, tag, values):
        self.calls.append(("histogram", step, tag))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_background_sink_keeps_order_and_flush_waits():
    inner = _Recorder()
    sink = BackgroundSink(inner)
    for step in range(50):
        sink.scalars(step, {"train/loss": float(step)})
        sink.histogram(step, "h", np.ones(2))
    sink.flush()
    assert len(inner.calls) == 101 and inner.calls[-1] == ("flush",)
    assert [c[1] for c in inner.calls[:-1:2]] == list(range(50))
    assert inner.calls[99] == ("histogram", 49, "h")
    sink.close()
    assert inner.calls[-1] == ("close",)
    with pytest.raises(RuntimeError, match="after close"):
        sink.scalars(1, {"a": 1.0})
    sink.close()  # idempotent


def test_background_sink_reraises_worker_errors():
    # A file-system error stays an OSError, which the command line reports as one line (exit 4).
    sink = BackgroundSink(_Recorder(fail_on="bad"))
    sink.scalars(1, {"bad": 1.0})
    with pytest.raises(OSError, match="writing metrics failed: disk full"):
        sink.flush()
    sink.close()
    # Anything else is a bug and keeps its type in the message.
    recorder = _Recorder()
    recorder.scalars = lambda step, values: 1 / 0
    sink = BackgroundSink(recorder)
    sink.scalars(1, {"a": 1.0})
    with pytest.raises(RuntimeError, match=r"background writer: ZeroDivisionError"):
        sink.flush()
    sink.close()


def test_full_disk_in_jsonl_sink_names_the_file(tmp_path, monkeypatch):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.scalars(1, {"train/loss": 1.0})

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # write() names no file

    real = sink._file
    sink._file = FullDisk()
    with pytest.raises(OSError, match=r"cannot write metrics.jsonl: No space left on device") as info:
        sink.flush()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "metrics.jsonl")
    sink._file = real
    sink.close()


def test_tensorboard_histogram_buckets(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.histogram(3, "h", np.array([0.0, 0.1, 0.1, 0.4]))
    sink.histogram(4, "same", np.array([2.0, 2.0]))
    sink.close()
    acc = _read_tb(tmp_path)
    (event,) = acc.Histograms("h")
    hist = event.histogram_value
    assert (event.step, hist.num, hist.min, hist.max) == (3, 4, 0.0, 0.4)
    assert hist.sum == pytest.approx(0.6) and hist.sum_squares == pytest.approx(0.18)
    # 4 values -> 4 equal buckets over [0, 0.4]: [0, .1) [.1, .2) [.2, .3) [.3, .4]
    np.testing.assert_allclose(hist.bucket_limit, [0.0, 0.1, 0.2, 0.3, 0.4])
    assert list(hist.bucket) == [0, 1, 2, 0, 1]
    (same,) = acc.Histograms("same")
    assert same.histogram_value.num == 2 and sum(same.histogram_value.bucket) == 2
