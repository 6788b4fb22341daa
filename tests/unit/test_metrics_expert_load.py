"""ExpertLoadTracker: math against hand-computed values, one reduce, reset, TensorBoard output."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from moe_dist.metrics import ExpertLoadTracker, MetricsLogger, TensorBoardSink
from moe_dist.metrics.expert_load import render_load_heatmap
from moe_dist.moe.stats import ExpertLoadStats


def _stats(routed, kept, tokens) -> ExpertLoadStats:
    stats = ExpertLoadStats(len(routed))
    stats.update(torch.tensor(routed), torch.tensor(kept), tokens)
    return stats


def test_layer_metrics_match_hand_computation():
    stats = _stats([4, 2, 2, 0], [3, 2, 2, 0], 4)
    report = ExpertLoadTracker([stats], layer_ids=[3]).collect()
    (layer,) = report.layers
    assert layer.layer_id == 3
    np.testing.assert_allclose(layer.load, [3 / 7, 2 / 7, 2 / 7, 0.0])
    assert layer.drop_rate == pytest.approx(1 / 8)       # 1 - 7/8
    assert layer.realized_k == pytest.approx(7 / 4)      # 7 kept assignments / 4 tokens
    assert layer.dead_experts == 1
    assert layer.imbalance == pytest.approx(3 / (7 / 4))  # max 3 over mean 7/4


def test_split_updates_accumulate_like_one():
    stats = ExpertLoadStats(4)
    stats.update(torch.tensor([3, 1, 0, 0]), torch.tensor([2, 1, 0, 0]), 2)
    stats.update(torch.tensor([1, 1, 2, 0]), torch.tensor([1, 1, 2, 0]), 2)
    layer = ExpertLoadTracker([stats], [0]).collect().layers[0]
    np.testing.assert_array_equal(layer.routed, [4, 2, 2, 0])
    np.testing.assert_array_equal(layer.kept, [3, 2, 2, 0])
    assert layer.tokens == 4


def test_reduce_fn_called_once_and_counters_reset():
    a = _stats([4, 2, 2, 0], [3, 2, 2, 0], 4)
    b = _stats([1, 1], [1, 0], 1)
    calls = []

    def two_identical_ranks(tensor: torch.Tensor) -> None:  # in-place, like dist.all_reduce
        calls.append(tuple(tensor.shape))
        tensor.mul_(2)

    tracker = ExpertLoadTracker([a, b], layer_ids=[1, 3], reduce_fn=two_identical_ranks)
    report = tracker.collect()
    assert calls == [(2, 2 * 4 + 1)]  # one reduction of the stacked [layers, routed|kept|tokens]
    first, second = report.layers
    np.testing.assert_array_equal(first.routed, [8, 4, 4, 0])
    assert first.tokens == 8 and first.drop_rate == pytest.approx(1 / 8)
    np.testing.assert_array_equal(second.kept, [2, 0])
    assert second.num_experts == 2 and second.dead_experts == 1 and second.drop_rate == pytest.approx(0.5)
    for stats in (a, b):
        assert stats.routed.sum() == 0 and stats.kept.sum() == 0 and stats.tokens == 0

    empty = tracker.collect()  # nothing happened since: ratios are undefined, not zero
    assert len(calls) == 2
    assert empty.layers[0].tokens == 0 and math.isnan(empty.layers[0].imbalance)
    assert math.isnan(empty.layers[0].realized_k) and empty.layers[0].dead_experts == 4


def test_reduce_fn_may_return_a_new_tensor():
    stats = _stats([2, 2], [2, 1], 2)
    report = ExpertLoadTracker([stats], [0], reduce_fn=lambda t: t * 3).collect()
    np.testing.assert_array_equal(report.layers[0].kept, [6, 3])
    assert report.layers[0].tokens == 6


def test_ragged_layers_pad_the_heatmap():
    wide = _stats([2, 2, 0, 0], [2, 2, 0, 0], 4)
    narrow = _stats([1, 3], [1, 3], 4)
    heat = ExpertLoadTracker([wide, narrow], [0, 1]).collect().heatmap
    assert heat.shape == (2, 4)
    np.testing.assert_allclose(heat[0], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(heat[1, :2], [0.25, 0.75])
    assert np.isnan(heat[1, 2:]).all()


def test_from_model_reads_block_index_from_module_path():
    class Block(nn.Module):
        def __init__(self, moe: bool) -> None:
            super().__init__()
            self.mlp = nn.Module()
            if moe:
                self.mlp.stats = ExpertLoadStats(4)

    model = nn.Module()
    model.layers = nn.ModuleList(Block(moe=i % 2 == 1) for i in range(4))
    tracker = ExpertLoadTracker.from_model(model)
    assert tracker.layer_ids == [1, 3]
    assert tracker.stats_modules[0] is model.layers[1].mlp.stats


def test_bad_construction_names_the_problem():
    with pytest.raises(ValueError, match="2 stats modules but 1 layer ids"):
        ExpertLoadTracker([ExpertLoadStats(2), ExpertLoadStats(2)], [0])
    with pytest.raises(ValueError, match="repeat a layer"):
        ExpertLoadTracker([ExpertLoadStats(2), ExpertLoadStats(2)], [1, 1])


def test_write_logs_documented_tags(tmp_path):
    tracker = ExpertLoadTracker([_stats([4, 2, 2, 0], [3, 2, 2, 0], 4), _stats([1, 1], [1, 1], 1)],
                                layer_ids=[1, 3])
    logger = MetricsLogger([TensorBoardSink(tmp_path)])
    tracker.write(tracker.collect(), logger, step=7)
    tracker.write(tracker.collect(), logger, step=8)  # empty window: nothing written
    logger.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for layer in (1, 3):
        for name in ("imbalance", "drop_rate", "realized_k", "dead_experts"):
            assert f"moe/layer_{layer}/{name}" in tags["scalars"]
        assert f"moe/layer_{layer}/load" in tags["histograms"]
    value = lambda tag: [(e.step, e.value) for e in acc.Scalars(tag)]  # noqa: E731
    assert value("moe/layer_1/drop_rate") == [(7, pytest.approx(0.125))]
    assert value("moe/layer_1/realized_k") == [(7, pytest.approx(1.75))]
    assert value("moe/layer_1/dead_experts") == [(7, 1.0)]
    assert value("moe/layer_3/imbalance") == [(7, pytest.approx(1.0))]
    (image,) = acc.Images("moe/load_heatmap")
    expected = render_load_heatmap(tracker_report_loads(), [1, 3], step=7)
    assert (image.step, image.height, image.width) == (7, *expected.shape[1:])
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")).transpose(2, 0, 1)
    assert (decoded == expected).all()  # the labelled picture, drawn on the writer's side
    for layer in (1, 3):  # the first window of each layer starts its over-time picture
        (over_time,) = acc.Images(f"moe/layer_{layer}/load_over_time")
        assert over_time.step == 7


def tracker_report_loads():
    """The [layers, experts] loads of test_write_logs_documented_tags' first window."""
    return np.array([[3 / 7, 2 / 7, 2 / 7, 0.0], [0.5, 0.5, np.nan, np.nan]])


def test_images_are_drawn_at_most_once_per_image_every_steps(tmp_path):
    """Scalars and histograms at every write; the pictures at the first write and then once
    ``image_every`` steps have passed, with every row gained in between (a row per window)."""
    stats = _stats([1, 1], [1, 1], 1)
    tracker = ExpertLoadTracker([stats], layer_ids=[0], image_every=3)
    logger = MetricsLogger([TensorBoardSink(tmp_path)])
    for step in range(1, 9):
        stats.update(torch.tensor([step, 1]), torch.tensor([step, 1]), 1)
        tracker.write(tracker.collect(), logger, step=step)
    logger.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("moe/layer_0/imbalance")] == list(range(1, 9))
    assert [e.step for e in acc.Histograms("moe/layer_0/load")] == list(range(1, 9))
    assert [image.step for image in acc.Images("moe/load_heatmap")] == [1, 4, 7]
    over_time = acc.Images("moe/layer_0/load_over_time")
    assert [image.step for image in over_time] == [1, 4, 7]
    # The step-7 picture has all seven windows as rows: the same pixels as drawing them directly.
    history = tracker.history[0]
    matrix, steps = history.matrix()
    assert steps == list(range(1, 9)) and matrix.shape == (8, 2)
    from moe_dist.metrics.expert_load import render_load_over_time
    expected = render_load_over_time(matrix[:7], steps[:7], 0, 1)
    decoded = np.asarray(Image.open(io.BytesIO(over_time[-1].encoded_image_string)).convert("RGB"))
    assert (decoded.transpose(2, 0, 1) == expected).all()


def test_image_every_must_be_positive():
    with pytest.raises(ValueError, match="image_every must be >= 1, got 0"):
        ExpertLoadTracker([_stats([1], [1], 1)], layer_ids=[0], image_every=0)
