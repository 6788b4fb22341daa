"""WandbSink offline: what it writes, read back with wandb's own reader; run id kept for a resume;
the missing-package error; build_sinks adding it on the logging rank only."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moe_dist.config import ConfigError
from moe_dist.config.run import LogConfig
from moe_dist.metrics import MetricsLogger, NullSink, WandbSink, build_sinks
from moe_dist.metrics import wandb_sink
from tests.unit.wandb_offline import history, offline_env, offline_runs, read_records

pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def _log_cfg(**changes) -> LogConfig:
    return LogConfig(wandb=True, wandb_project="moe-dist-tests", **changes)


def test_offline_run_holds_scalars_histograms_images_and_config(tmp_path, offline, caplog):
    run_dir = tmp_path / "my-run"
    sink = WandbSink(run_dir, _log_cfg(), run_config={"train": {"lr": 0.003}, "moe": {"top_k": 2}})
    sink.text("config", "```\ntrain:\n  lr: 0.003\n```")  # the config is the W&B config instead
    sink.text("notes", "hello")
    sink.scalars(1, {"train/loss": 5.5, "train/lr": 1e-3})
    sink.scalars(2, {"train/loss": 5.25})
    sink.histogram(2, "moe/layer_1/load", np.array([0.1, 0.2, 0.3, 0.4]))
    sink.image(2, "moe/load_heatmap", np.zeros((3, 8, 16), dtype=np.uint8))
    sink.scalars(2, {"val/loss": 5.0})  # a second call for the same step joins its row
    with caplog.at_level(logging.WARNING):
        sink.scalars(1, {"train/loss": 9.0})  # below the current step: dropped, said once
        sink.scalars(1, {"train/loss": 9.0})
    assert sum("W&B keeps their first values" in r.message for r in caplog.records) == 1
    sink.close()
    sink.close()  # idempotent

    (offline_run,) = offline_runs(run_dir)
    records = read_records(offline_run)
    rows = history(records)
    assert sorted(rows) == [1, 2]
    assert rows[1] == {"train/loss": 5.5, "train/lr": 1e-3}
    assert rows[2]["train/loss"] == 5.25 and rows[2]["val/loss"] == 5.0
    assert rows[2]["moe/layer_1/load._type"] == "histogram" and sum(rows[2]["moe/layer_1/load.values"]) == 4
    assert rows[2]["moe/load_heatmap._type"] == "image-file"
    assert (rows[2]["moe/load_heatmap.height"], rows[2]["moe/load_heatmap.width"]) == (8, 16)
    assert (offline_run / "files" / rows[2]["moe/load_heatmap.path"]).is_file()
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "moe-dist-tests" and run["display_name"] == "my-run"
    assert run["config"]["update"]["train"] == {"lr": 0.003}
    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary.get("notes") == "hello" and "config" not in summary


def test_a_resumed_run_keeps_its_wandb_id(tmp_path, offline):
    run_dir = tmp_path / "run"
    first = WandbSink(run_dir, _log_cfg(wandb_run_name="named"))
    first.scalars(1, {"train/loss": 1.0})
    first.close()
    second = WandbSink(run_dir, _log_cfg(wandb_run_name="named"))
    second.scalars(2, {"train/loss": 0.5})
    second.close()
    stored = (run_dir / "wandb" / "run_id").read_text().strip()
    runs = offline_runs(run_dir)
    assert len(runs) == 2
    records = [read_records(path) for path in runs]
    assert [next(r["run"]["run_id"] for r in rs if r["type"] == "run") for rs in records] == [stored, stored]
    assert history(records[1]) == {2: {"train/loss": 0.5}}


def test_build_sinks_adds_wandb_on_the_logging_rank_only(tmp_path, offline):
    cfg = _log_cfg(tensorboard=False)
    other = build_sinks(tmp_path / "other", cfg, is_logging_rank=False)
    assert isinstance(other.sinks[0], NullSink) and not (tmp_path / "other").exists()
    logger = build_sinks(tmp_path / "run", cfg, is_logging_rank=True, background=False,
                         run_config={"train": {"steps": 3}})
    assert isinstance(logger, MetricsLogger)
    assert [type(s).__name__ for s in logger.sinks] == ["JsonlSink", "WandbSink"]
    logger.scalars(3, {"train/loss": 2.0})
    logger.close()
    (offline_run,) = offline_runs(tmp_path / "run")
    assert history(read_records(offline_run)) == {3: {"train/loss": 2.0}}


def test_missing_wandb_is_a_config_error_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(wandb_sink.importlib.util, "find_spec", lambda name: None)
    for rank_logs in (True, False):
        with pytest.raises(ConfigError, match=r"log.wandb=true needs the 'wandb' package.*\[wandb\] extra"):
            build_sinks(tmp_path, SimpleNamespace(tensorboard=False, wandb=True), is_logging_rank=rank_logs)
    assert not Path(tmp_path, "metrics.jsonl").exists()


def test_log_config_keys():
    assert LogConfig().wandb is False  # off unless asked
    with pytest.raises(ConfigError, match="log.wandb_project is empty"):
        LogConfig(wandb=True, wandb_project=" ")
