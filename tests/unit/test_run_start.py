"""A run's start and end as the run directory records them (issue 17 sections 2 and 5): the
identity (config.yaml) written only once data and model are built, TensorBoard purged back to the
resumed step, provenance.json, ``--version`` and the last line of a run.

The kill -9 and resume end to end, read back with TensorBoard's EventAccumulator, is
``tests/smoke/test_train_single.py::test_resume_after_kill_matches_uninterrupted_run``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.distributed.mesh import MeshLayout
from moe_dist.metrics import TensorBoardSink
from moe_dist.train import provenance
from moe_dist.train.entry import _report_end
from moe_dist.train.run_dir import prepare_run_dir
from moe_dist.train.trainer import FitResult

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
        "moe.num_experts=4", "moe.expert_ffn_dim=32", "data.seq_len=32", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.steps=1", "train.warmup_steps=0", "train.eval_every=0",
        "log.progress_bar=false", "log.tensorboard=false"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    from moe_dist.distributed import launch_env

    for key in (*launch_env._TORCHRUN_KEYS, *launch_env._OMPI_KEYS, *launch_env._SLURM_KEYS):
        monkeypatch.delenv(key, raising=False)


def test_a_run_that_fails_on_its_data_does_not_take_over_its_directory(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document {i}: " + "to be or not to be " * 20}) + "\n"
                              for i in range(8)))
    run_dir = tmp_path / "run"
    common = [*TINY, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]

    assert main(["train", "--run-dir", str(run_dir), *common]) == 2  # text_field defaults to "text"
    assert "data.text_field" in capsys.readouterr().err
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "provenance.json").exists()

    assert main(["train", "--run-dir", str(run_dir), *common, "data.text_field=body"]) == 0
    recorded = load_config(run_dir / "config.yaml")
    assert recorded.data.text_field == "body"
    assert recorded.model.vocab_size == 0  # as loaded, not as resolved from the data: a rerun compares equal
    prepare_run_dir(run_dir, load_config(None, [*common, "data.text_field=body", "train.steps=2"]),
                    overwrite=False, is_writer=False)


def test_purge_step_hides_what_an_interrupted_attempt_logged_past_its_checkpoint(tmp_path):
    """The first attempt logged steps 1-6 (flushed) and was killed with its checkpoint at 3; the
    resumed attempt logs 4-8. TensorBoard's own reader sees each step once, the newer value."""
    first = TensorBoardSink(tmp_path)
    for step in range(1, 7):
        first.scalars(step, {"train/loss": 10.0 + step})
    first.close()
    resumed = TensorBoardSink(tmp_path, purge_step=4)
    for step in range(4, 9):
        resumed.scalars(step, {"train/loss": 20.0 + step})
    resumed.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 9))
    assert [e.value for e in events] == [11.0, 12.0, 13.0, 24.0, 25.0, 26.0, 27.0, 28.0]


def _entry(step: int) -> dict:
    layout = MeshLayout(world_size=8, dp=4, tp=2, ep=4, etp=1)
    return provenance.collect_provenance(layout, step, "torchrun", "native", torch.device("cpu"),
                                         argv=["moe-dist", "train", "--run-dir", "runs/a", "moe.num_experts=8"])


def test_provenance_records_every_start(tmp_path):
    provenance.append_provenance(tmp_path, _entry(0))
    provenance.append_provenance(tmp_path, _entry(120))
    entries = json.loads((tmp_path / "provenance.json").read_text())
    assert [e["start_step"] for e in entries] == [0, 120]
    entry = entries[-1]
    assert entry["moe_dist_version"] == provenance.package_version() != "unknown"
    assert entry["command"].endswith("moe-dist train --run-dir runs/a moe.num_experts=8")
    assert (entry["world_size"], entry["mesh"]) == (8, {"dp": 4, "tp": 2, "ep": 4, "etp": 1, "edp": 2})
    assert entry["launcher"] == "torchrun" and entry["torch"] == torch.__version__
    assert entry["cuda"] == torch.version.cuda
    import importlib.metadata

    assert entry["deepspeed"] == importlib.metadata.version("deepspeed")
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():  # the test runs from the checkout
        assert len(entry["git"]["commit"]) == 40 and isinstance(entry["git"]["dirty"], bool)
    assert not (tmp_path / "provenance.json.tmp").exists()


def test_an_unreadable_provenance_file_is_kept_aside(tmp_path, caplog):
    (tmp_path / "provenance.json").write_text("{not json")
    provenance.append_provenance(tmp_path, _entry(5))
    assert (tmp_path / "provenance.json.unreadable").read_text() == "{not json"
    assert [e["start_step"] for e in provenance.read_provenance(tmp_path)] == [5]
    assert "kept as provenance.json.unreadable" in caplog.text


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"moe-dist {provenance.package_version()}")


def test_last_line_says_preempted_or_complete(tmp_path, caplog):
    cfg = load_config(None, ["train.steps=20"])
    (tmp_path / "metrics.jsonl").write_text('{"step": 20, "loss": 1.5, "val_loss": 1.75}\n')
    with caplog.at_level(logging.INFO, logger="moe_dist.train.entry"):
        _report_end(cfg, tmp_path, FitResult(12, 2.0, None, preempted=True))
        _report_end(cfg, tmp_path, FitResult(20, None, None, already_complete=True))
    preempted, complete = [r.getMessage() for r in caplog.records]
    assert preempted.startswith("preempted at step 12 (checkpoint saved); rerun the same command to resume")
    assert "finished" not in preempted
    assert complete.startswith("nothing to train: this run is already complete at step 20 (train.steps=20), "
                               "last logged loss 1.5000, val_loss 1.7500")
    assert "n/a" not in complete and str(tmp_path) in complete
