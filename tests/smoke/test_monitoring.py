"""One short real run with W&B offline and the profiler on: W&B holds the same scalars as
TensorBoard (read back with wandb's own reader), the trace covers the asked steps, and the
expert-load pictures are written."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.smoke.conftest import REPO, train_command, train_env
from tests.unit.wandb_offline import history, offline_env, offline_runs, read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("monitoring")
    run_dir = tmp / "run"
    command = train_command(run_dir, "train.steps=6", "log.every=2", "train.eval_every=3", "checkpoint.every=0",
                            "log.wandb=true", "log.wandb_project=moe-dist-smoke", "train.profile_steps=3-4",
                            "log.image_every=2")
    result = subprocess.run(command, cwd=REPO, env=train_env(**offline_env(tmp)), capture_output=True, text=True,
                            timeout=240)
    if result.returncode != 0:
        pytest.fail(f"moe-dist train failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return run_dir


def test_wandb_offline_run_has_the_tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    (offline_run,) = offline_runs(run_dir)
    records = read_records(offline_run)
    rows = history(records)
    tb_tags = set(acc.Tags()["scalars"])
    wandb_scalars = {key for row in rows.values() for key, value in row.items()
                     if isinstance(value, (int, float)) and "." not in key.rsplit("/", 1)[-1]}
    assert {"train/loss", "val/loss", "perf/tokens_per_s", "moe/layer_1/imbalance"} <= tb_tags
    assert wandb_scalars == tb_tags
    compared = 0
    for tag in tb_tags:
        for event in acc.Scalars(tag):  # TensorBoard stores float32
            assert rows[event.step][tag] == pytest.approx(event.value, rel=1e-6, abs=1e-6), (tag, event.step)
            compared += 1
    assert compared >= 3 * 10
    assert sorted(rows) == [2, 3, 4, 6]  # logging steps and the evaluation step
    assert rows[6]["moe/load_heatmap._type"] == "image-file"
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "moe-dist-smoke" and run["display_name"] == "run"
    assert run["config"]["update"]["train"]["profile_steps"] == "3-4"
    assert {"moe/load_heatmap", "moe/layer_0/load_over_time", "moe/layer_1/load_over_time"} <= set(
        acc.Tags()["images"])
    assert [image.step for image in acc.Images("moe/layer_1/load_over_time")] == [2, 4, 6]


def test_profiler_trace_holds_the_asked_steps(run_dir):
    (trace,) = (run_dir / "profile").iterdir()
    assert trace.name == "rank0_steps3-4.pt.trace.json"
    names = {event.get("name", "") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= names and "ProfilerStep#2" not in names
    assert "layers.1.mlp.experts [GroupedExperts]" in names
