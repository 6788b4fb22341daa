"""End-to-end single-process training: metrics, TensorBoard tags, resume after a real kill,
and the bad inputs a user can give."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.smoke.conftest import REPO, read_metrics, run_train, train_command, train_env

pytestmark = pytest.mark.slow


def test_training_writes_run_dir_metrics_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "train.steps=6", "log.every=3", "train.eval_every=3", "checkpoint.every=3",
                       "train.warmup_steps=8")
    # stderr is a pipe, not a terminal: no bar, one text line per logging step, a start-up summary
    assert "\r" not in result.stderr
    assert "model: " in result.stderr and "parameters (" in result.stderr and "tokens per step" in result.stderr
    step_lines = [line for line in result.stderr.splitlines() if "| loss " in line]
    assert len(step_lines) == 2 and "step 3/6 | loss " in step_lines[0] and "step 6/6 | loss " in step_lines[1]
    assert all(" tok/s" in line and "grad_norm" in line and "val_loss" in line for line in step_lines)
    assert "train.warmup_steps (8) >= train.steps (6)" in result.stderr
    assert (run_dir / "config.yaml").is_file()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [3, 6]
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
        assert key in records[-1], key
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm",
                "val/loss", "perf/tokens_per_s"}
    for layer in (0, 1):
        expected |= {f"moe/layer_{layer}/{name}" for name in ("imbalance", "drop_rate", "realized_k", "dead_experts")}
    assert expected <= scalars, expected - scalars
    assert {"moe/layer_0/load", "moe/layer_1/load"} <= set(acc.Tags()["histograms"])
    assert "moe/load_heatmap" in acc.Tags()["images"]
    realized_k = acc.Scalars("moe/layer_0/realized_k")[-1].value
    assert realized_k == pytest.approx(2.0)  # dropless top-2


def test_every_step_logging_is_read_one_step_late_but_written_at_its_step(tmp_path):
    """log.every=1 stages each window and reads it at the next step; evaluation and checkpoint
    steps read theirs at once, so val/loss shares its step's record and a checkpoint's
    metrics.jsonl holds every step up to it."""
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=5", "log.every=1", "train.eval_every=2", "checkpoint.every=3")
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [("val_loss" in r) for r in records] == [False, True, False, True, True]
    assert all("loss" in r and r["tokens_per_s"] > 0 for r in records)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000005"]


def test_compiled_blocks_train_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=2", "log.every=1", "train.compile=true", "train.eval_every=0")
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)


def _kill_during_save(process: subprocess.Popen, run_dir: Path, steps: list[int]) -> int:
    """SIGKILL ``process`` while it writes one of the checkpoints of ``steps`` (the first whose
    save it can be stopped in); the step it was saving. A save flushes metrics.jsonl and the
    TensorBoard events first, so the killed attempt has logged past its newest complete checkpoint."""
    root = run_dir / "checkpoints"
    for step in steps:
        tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
        deadline = time.time() + 180
        while not tmp.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.001)
        process.send_signal(signal.SIGSTOP)  # frozen mid-save (a save takes ~50 ms here) ...
        if tmp.exists() and not final.exists():
            process.send_signal(signal.SIGKILL)  # ... and killed there
            process.wait()
            return step
        process.send_signal(signal.SIGCONT)  # the save finished before the stop: try the next one
    process.kill()
    process.wait()
    pytest.fail(f"could not stop the run inside the save of any of the checkpoints {steps}")


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """kill -9 in the middle of a checkpoint save, then the same command again: the run resumes
    from the checkpoint before, its losses equal an uninterrupted run's, TensorBoard (read with its
    own EventAccumulator) holds each step once with the resumed values, provenance.json has one
    entry per start; a third run of the same command says the run is complete."""
    overrides = ["train.steps=12", "log.every=1", "train.eval_every=0", "checkpoint.every=4",
                 "checkpoint.keep_last=3"]
    reference = tmp_path / "reference"
    run_train(reference, *overrides)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(train_command(interrupted, *overrides), cwd=REPO, env=train_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in = _kill_during_save(process, interrupted, [8, 12])
    assert process.returncode == -signal.SIGKILL
    resumed_at = killed_in - 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tensorboard_losses() -> list[tuple[int, float]]:
        acc = EventAccumulator(str(interrupted / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        return [(event.step, event.value) for event in acc.Scalars("train/loss")]

    assert [step for step, _ in tensorboard_losses()] == list(range(1, killed_in + 1))  # flushed before the save

    result = run_train(interrupted, *overrides)  # checkpoint.resume=auto is the default
    assert f"resumed from {interrupted / 'checkpoints' / f'step_{resumed_at:08d}'} at step {resumed_at}" \
        in result.stderr
    got = {r["step"]: r["loss"] for r in read_metrics(interrupted)}
    want = {r["step"]: r["loss"] for r in read_metrics(reference)}
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    board = tensorboard_losses()
    assert [step for step, _ in board] == list(range(1, 13))  # no step twice (purge_step)
    assert [value for _, value in board] == pytest.approx([got[step] for step in range(1, 13)], rel=1e-6)

    result = run_train(interrupted, *overrides)
    assert "nothing to train: this run is already complete at step 12 (train.steps=12), last logged loss " \
        f"{got[12]:.4f}" in result.stderr and "n/a" not in result.stderr
    starts = json.loads((interrupted / "provenance.json").read_text())
    assert [entry["start_step"] for entry in starts] == [0, resumed_at]  # the complete run started nothing
    assert starts[1]["argv"][1:] == train_command(interrupted, *overrides)[3:]


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(run_dir, "train.steps=400", "log.every=1", "train.eval_every=0",
                                             "checkpoint.every=0"),
                               cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 124, stderr[-2000:]
    saved = list((run_dir / "checkpoints").glob("step_*"))
    step = int(saved[0].name.split("_")[1])
    assert len(saved) == 1 and step < 400
    assert f"preempted at step {step} (checkpoint saved); rerun the same command to resume" in stderr
    assert "finished at step" not in stderr


def test_bad_inputs_fail_with_clear_messages(tmp_path):
    result = run_train(tmp_path / "a", "data.source=/no/such/corpus", check=False)
    assert result.returncode == 2 and "data.source" in result.stderr and "/no/such/corpus" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_train(tmp_path / "b", "moe.router.top_k=5", check=False)
    assert result.returncode == 2 and "moe.router.top_k (5) cannot exceed moe.num_experts (4)" in result.stderr

    run_dir = tmp_path / "c"
    run_train(run_dir, "train.steps=2", "train.eval_every=0")
    result = run_train(run_dir, "train.steps=2", "moe.num_experts=8", check=False)
    assert result.returncode == 2 and "holds a different run" in result.stderr and "--overwrite" in result.stderr
    run_train(run_dir, "train.steps=2", "moe.num_experts=8", "train.eval_every=0", extra_args=("--overwrite",))


def test_corrupt_checkpoints_are_skipped_or_named(tmp_path):
    """A damaged newest checkpoint: checkpoint.resume=auto skips it with a warning naming it and
    resumes from the one before; named explicitly, it stops the run with one line and exit
    status 4. Nothing is deleted. (Every other damage is covered in tests/unit/test_checkpoint_files.py.)"""
    from moe_dist.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    common = ["train.steps=2", "train.eval_every=0", "log.every=1", "checkpoint.every=1"]
    run_train(run_dir, *common)
    newest = ckpt.latest_checkpoint(run_dir)
    assert newest.name == "step_00000002"
    ckpt.verify_checkpoint(newest)

    from moe_dist.distributed.checkpoint import read_metadata  # model and optimizer are one DCP checkpoint

    stored = read_metadata(newest).state_dict_metadata
    state = {k: torch.zeros(tuple(v.size)) for k, v in stored.items() if k.startswith("model.")}
    key = next(k for k in state if k.endswith("experts.w13"))
    wrong = dict(state)
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(ckpt.CheckpointError, match=rf"tensor {key}: checkpoint shape \(3, 3\) != model shape"):
        ckpt.check_state_dict_fits(wrong, state, "test")

    with open(newest / "__0_0.distcp", "r+b") as handle:
        handle.seek(100)
        handle.write(b"corrupted!")
    result = run_train(tmp_path / "branch", *common, f"checkpoint.resume={newest}", check=False)
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"moe-dist: checkpoint error: checkpoint {newest}: file __0_0.distcp is corrupt" in result.stderr
    assert "resume from an older checkpoint" in result.stderr

    result = run_train(run_dir, *common)
    assert f"skipping a checkpoint that does not verify: checkpoint {newest}: file __0_0.distcp is corrupt" \
        in result.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000001'} at step 1" in result.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    ckpt.verify_checkpoint(newest)  # replaced by the resumed run's own save of step 2


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
    from moe_dist.train import checkpoint as ckpt

    def write_then_die(directory: Path):
        (directory / "model.pt").write_bytes(b"half")
        raise KeyboardInterrupt  # the process dies mid-save

    good = ckpt.save_checkpoint(tmp_path, 1, lambda d: ckpt.torch_save({"w": torch.ones(2)}, d / "model.pt"), keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, write_then_die, keep_last=2)
    assert ckpt.latest_checkpoint(tmp_path) == good
    ckpt.verify_checkpoint(good)


def test_resume_into_a_new_run_follows_the_configured_lr(tmp_path):
    from moe_dist.config import TrainConfig
    from moe_dist.train.optim import lr_multiplier

    first = tmp_path / "first"
    run_train(first, "train.steps=4", "train.eval_every=0", "log.every=1", "checkpoint.every=2")
    second = tmp_path / "second"
    run_train(second, "train.steps=6", "train.eval_every=0", "log.every=1", "train.lr=1e-4",
              f"checkpoint.resume={first / 'checkpoints' / 'step_00000004'}")
    records = {r["step"]: r for r in read_metrics(second)}
    assert sorted(records) == [5, 6]
    schedule = TrainConfig(steps=6, lr=1e-4, warmup_steps=2)
    assert records[6]["lr"] == pytest.approx(1e-4 * lr_multiplier(5, schedule), rel=1e-9)


@pytest.mark.parametrize("optimizer", ["train.optimizer_impl=fused", "train.optimizer_state_dtype=bf16"])
def test_optimizer_variants_resume_exactly(tmp_path, optimizer):
    """Fused AdamW (CUDA's 'auto'; the CPU fused kernel here: a tensor step per parameter) and
    the bf16-moment AdamW (an integer step, bf16 moments): their state goes through the DCP
    checkpoint, and a run resumed at step 3 continues with the uninterrupted run's losses."""
    overrides = [optimizer, "train.eval_every=0", "log.every=1", "checkpoint.every=3"]
    whole = tmp_path / "whole"
    run_train(whole, "train.steps=5", *overrides)
    resumed = tmp_path / "resumed"
    run_train(resumed, "train.steps=5", *overrides, f"checkpoint.resume={whole / 'checkpoints' / 'step_00000003'}")
    want = {r["step"]: r["loss"] for r in read_metrics(whole)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_resume_across_optimizer_settings_keeps_the_configured_implementation(tmp_path):
    """A checkpoint of torch's AdamW (the loop) resumes with bf16 moments, and that one with a
    fused torch AdamW: each run steps its own optimizer (param-group keys the checkpoint lacks,
    and the implementation keys, keep the resuming optimizer's values)."""
    common = ["train.eval_every=0", "log.every=1"]
    first, second, third = tmp_path / "loop", tmp_path / "bf16", tmp_path / "fused"
    run_train(first, "train.steps=3", "checkpoint.every=3", *common)
    run_train(second, "train.steps=5", "train.optimizer_state_dtype=bf16", *common,
              f"checkpoint.resume={first / 'checkpoints' / 'step_00000003'}")
    run_train(third, "train.steps=7", "train.optimizer_impl=fused", *common,
              f"checkpoint.resume={second / 'checkpoints' / 'step_00000005'}")
    assert sorted(r["step"] for r in read_metrics(third)) == [6, 7]

    from moe_dist.distributed.checkpoint import _restorable_groups, read_metadata

    metadata = read_metadata(third / "checkpoints" / "step_00000007")
    groups = _restorable_groups([{"lr": 1.0, "fused": False, "not_in_checkpoint": 3}], metadata)
    assert groups == [{"lr": 1.0}]  # the saved lr is read back; the rest stays as the optimizer has it
