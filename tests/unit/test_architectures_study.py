"""The GPU architecture study's tooling end to end on the CPU: a sweep with a per-run base config
and seeds, run two at a time (real `moe-dist train` processes, 5 steps at d=32), then
docs/architectures_study.py's mean ± std table and plot, checked against the runs' own metrics."""

import importlib.util
import json
import shutil
import statistics
import tarfile
from pathlib import Path

import pytest
import yaml

from moe_dist.cli import main

REPO = Path(__file__).resolve().parents[2]


def _study_module():
    spec = importlib.util.spec_from_file_location("architectures_study", REPO / "docs" / "architectures_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _final_val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def test_row_names_drop_only_the_seed():
    study = _study_module()
    assert study.row_name("peer,seed=2") == "peer"
    assert study.row_name("seed=0") == "base"
    assert study.row_name("num_experts=8,seed=11,top_k=2") == "num_experts=8,top_k=2"
    assert study.row_name("reseed=1") == "reseed=1"


def test_sweep_of_two_rows_and_two_seeds_gives_mean_and_std(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sweep_file = tmp_path / "study.yaml"
    sweep_file.write_text(
        f"base: {REPO / 'configs' / 'tiny.yaml'}\n"
        "overrides: {model.dim: 32, model.n_layers: 2, model.n_heads: 2, model.ffn_dim: 64, model.max_seq_len: 32,\n"
        "  moe.expert_ffn_dim: 32, data.seq_len: 32, train.steps: 5, train.global_batch_size: 2,\n"
        "  train.micro_batch_size: 2, train.warmup_steps: 1, train.eval_every: 5, train.eval_batches: 1,\n"
        "  checkpoint.every: 0, log.every: 1, log.tensorboard: false, log.progress_bar: false, train.device: cpu}\n"
        "runs:\n  - {name: moe_top2}\n"
        f"  - {{name: switchhead, base: {REPO / 'configs' / 'switchhead.yaml'}, model.switchhead.head_dim: 8}}\n"
        "seeds: [0, 1]\n")
    out = tmp_path / "runs"
    assert main(["sweep", "--config", str(sweep_file), "--out", str(out), "--parallel", "2",
                 "--run-timeout", "300"]) == 0
    status = json.loads((out / "sweep_status.json").read_text())
    assert sorted(status) == ["moe_top2,seed=0", "moe_top2,seed=1", "switchhead,seed=0", "switchhead,seed=1"]
    assert {entry["status"] for entry in status.values()} == {"done"}

    study = _study_module()
    summary = study.write_sweep_summary(out, tmp_path / "summary")
    rows = {row["row"]: row for row in summary["rows"]}
    assert list(rows) == ["moe_top2", "switchhead"] and summary["problems"] == {}
    for name, row in rows.items():
        losses = [_final_val_loss(out / f"{name},seed={seed}") for seed in (0, 1)]
        assert row["seeds"] == [0, 1]
        assert row["val_loss"] == pytest.approx(statistics.fmean(losses))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(losses))
        assert row["params"] > row["active_params"] > 0  # experts: 2 of 8 active
    assert rows["switchhead"]["flops_per_token"] != rows["moe_top2"]["flops_per_token"]
    table = (tmp_path / "summary" / "architectures_gpu.md").read_text()
    losses = [_final_val_loss(out / f"moe_top2,seed={seed}") for seed in (0, 1)]
    assert (f"| moe_top2 | 2 | {rows['moe_top2']['val_loss']:.4f} ± {rows['moe_top2']['val_loss_std']:.4f} "
            f"| {losses[0]:.4f} (seed 0), {losses[1]:.4f} (seed 1) |") in table
    assert (tmp_path / "summary" / "architectures_gpu.png").stat().st_size > 0

    # A run the sweep reports as stopped is listed and left out of its row's mean.
    status["switchhead,seed=1"] = {"status": "timeout", "reason": "run timeout 300 s"}
    (out / "sweep_status.json").write_text(json.dumps(status))
    summary = study.write_sweep_summary(out, tmp_path / "summary2")
    switchhead = next(row for row in summary["rows"] if row["row"] == "switchhead")
    assert switchhead["seeds"] == [0] and switchhead["val_loss_std"] is None
    assert switchhead["val_loss"] == pytest.approx(_final_val_loss(out / "switchhead,seed=0"))
    table = (tmp_path / "summary2" / "architectures_gpu.md").read_text()
    assert "Not averaged: switchhead,seed=1: timeout run timeout 300 s" in table
    assert "(1 seed)" in table

    # Batches merge: the first batch as its tarball (seed 1 stopped), then a later batch holding
    # only a finished seed 1, which wins; the merged row is the full two-seed row again.
    batch1 = tmp_path / "batch1.tar.gz"
    with tarfile.open(batch1, "w:gz") as tar:
        tar.add(out, arcname=".")
    batch2 = tmp_path / "batch2"
    shutil.copytree(out / "switchhead,seed=1", batch2 / "switchhead,seed=1")
    (batch2 / "sweep_status.json").write_text(json.dumps({"switchhead,seed=1": {"status": "done"}}))
    merged = study.write_sweep_summary([batch1, batch2], tmp_path / "summary3")
    switchhead = next(row for row in merged["rows"] if row["row"] == "switchhead")
    assert switchhead["seeds"] == [0, 1] and merged["problems"] == {}
    assert switchhead["val_loss"] == pytest.approx(rows["switchhead"]["val_loss"])
    only_batch1 = study.summarize_sweep([batch1])
    assert "switchhead,seed=1" in only_batch1["problems"]

    # A later batch whose run differs in more than its seed is not averaged in, and says why.
    batch3 = tmp_path / "batch3"
    shutil.copytree(out / "moe_top2,seed=1", batch3 / "moe_top2,seed=1")
    cfg = yaml.safe_load((batch3 / "moe_top2,seed=1" / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.5
    (batch3 / "moe_top2,seed=1" / "config.yaml").write_text(yaml.safe_dump(cfg))
    mixed = study.summarize_sweep([out, batch3])
    moe_top2 = next(row for row in mixed["rows"] if row["row"] == "moe_top2")
    assert moe_top2["seeds"] == [0]
    assert mixed["problems"]["moe_top2,seed=1"]["status"] == "not comparable"
    assert "train.lr" in mixed["problems"]["moe_top2,seed=1"]["reason"]
