"""`moe-dist sweep` and `moe-dist report` end to end on tiny runs.

A two-run sweep is SIGKILLed (sweep and training process together) once the second run has
written a checkpoint; running the same sweep again skips the finished run without starting it
and resumes the killed one from its checkpoint, so its metrics hold every logged step once.
The report of the sweep directory then has a row per run whose numbers are those of the runs'
metrics.jsonl, and the four plots.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, TINY, read_metrics, train_env

pytestmark = pytest.mark.slow

STEPS = 20


def _tiny_overrides():
    overrides = dict(item.split("=", 1) for item in TINY)
    overrides.update({"train.steps": STEPS, "checkpoint.every": 2, "checkpoint.keep_last": 1, "log.every": 2})
    return {key: yaml.safe_load(str(value)) for key, value in overrides.items()}


def _sweep(*args):
    return [sys.executable, "-m", "moe_dist.cli", "sweep", *args]


def _checkpoint_steps(run_dir):
    root = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "manifest.json").is_file()) \
        if root.is_dir() else []


def test_sweep_skips_finished_resumes_killed_and_reports(tmp_path):
    spec = {"name": "smoke", "base": str(REPO / "configs" / "tiny.yaml"), "overrides": _tiny_overrides(),
            "grid": {"moe.num_experts": [2, 4]}}
    sweep_file = tmp_path / "smoke.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    first, second = out / "num_experts=2", out / "num_experts=4"

    # 1. Run the sweep and kill it (with its training child) once run 2 has a checkpoint.
    # train.eval_every from the command line: applied to every run of the sweep
    proc = subprocess.Popen(_sweep("--config", str(sweep_file), "--out", str(out), "train.eval_every=10"),
                            cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not _checkpoint_steps(second) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    assert _checkpoint_steps(first) == [STEPS], output
    killed_at = _checkpoint_steps(second)
    assert killed_at and killed_at[-1] < STEPS, f"run 2 was not interrupted: {killed_at}\n{output}"

    # 2. The same command again: run 1 is not started, run 2 resumes and finishes.
    first_log = (out / "logs" / "num_experts=2.log").read_text()
    result = subprocess.run(_sweep("--config", str(sweep_file), "--out", str(out), "train.eval_every=10"),
                            cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "num_experts=2: finished, skipped" in result.stdout
    assert f"num_experts=4: resume from step {killed_at[-1]}" in result.stdout
    assert (out / "logs" / "num_experts=2.log").read_text() == first_log
    assert f"at step {killed_at[-1]}" in (out / "logs" / "num_experts=4.log").read_text().split("resumed from")[-1]
    assert _checkpoint_steps(second) == [STEPS]
    steps = [record["step"] for record in read_metrics(second)]
    assert steps == list(range(2, STEPS + 1, 2))

    # 3. Report: one row per run, numbers from the metrics, plots written.
    report = subprocess.run([sys.executable, "-m", "moe_dist.cli", "report", str(out)], cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stdout + report.stderr
    rows = list(csv.DictReader(open(out / "report" / "runs.csv")))
    assert [row["run"] for row in rows] == ["num_experts=2", "num_experts=4"]
    for row, run_dir in zip(rows, (first, second)):
        records = read_metrics(run_dir)
        assert float(row["final_loss"]) == records[-1]["loss"]
        assert float(row["final_val_loss"]) == [r["val_loss"] for r in records if "val_loss" in r][-1]
        assert int(row["final_step"]) == STEPS and row["moe.num_experts"] == run_dir.name.split("=")[1]
        assert [r["step"] for r in records if "val_loss" in r] == [10, 20]  # train.eval_every=10 reached each run
    assert int(rows[1]["total_params"]) > int(rows[0]["total_params"])
    # top-2 of 2 and of 4 experts: the same experts per token; only the 2 x dim router rows per layer differ
    assert int(rows[1]["active_params"]) - int(rows[0]["active_params"]) == 2 * 2 * 32
    for name in ("loss_vs_flops", "loss_vs_params", "throughput", "balance"):
        assert (out / "report" / f"{name}.png").stat().st_size > 1000
    assert "fit num_experts=4: val_loss = " in report.stdout
