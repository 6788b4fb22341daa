"""Checkpoint files a run may find half-written, damaged or missing, and a save that meets a full
disk: what ``resolve_resume`` picks, what it warns about, and that nothing is deleted or lost.

The checkpoints here are written by ``save_checkpoint`` with a small torch payload, so every case
runs in milliseconds; ``tests/smoke/test_train_single.py`` does the same end to end once.
"""

from __future__ import annotations

import errno
import re
import json
from pathlib import Path

import pytest
import torch

from moe_dist.config import ConfigError
from moe_dist.train import checkpoint as ckpt


def payload(value: float):
    def write(directory: Path) -> None:
        ckpt.torch_save({"w": torch.full((64,), value)}, directory / "trainer.pt")
        (directory / "config.yaml").write_text("train: {}\n")
    return write


def save(run_dir: Path, *steps: int, keep_last: int = 5) -> list[Path]:
    return [ckpt.save_checkpoint(run_dir, step, payload(float(step)), keep_last=keep_last) for step in steps]


class Warnings(list):
    def __call__(self, message: str, *args) -> None:
        self.append(message % args)


# How a newest checkpoint can be damaged: each must be skipped with a warning naming it.
def no_manifest(directory: Path) -> None:
    (directory / "manifest.json").unlink()


def truncated_trainer_pt(directory: Path) -> None:
    data = (directory / "trainer.pt").read_bytes()
    (directory / "trainer.pt").write_bytes(data[: len(data) // 2])


def flipped_byte(directory: Path) -> None:
    with open(directory / "trainer.pt", "r+b") as handle:
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 0xFF]))


def manifest_not_json(directory: Path) -> None:
    (directory / "manifest.json").write_text('{"step": 3, "files": {')


def manifest_without_files(directory: Path) -> None:
    (directory / "manifest.json").write_text(json.dumps({"step": 3}))


def file_missing(directory: Path) -> None:
    (directory / "config.yaml").unlink()


DAMAGE = {
    no_manifest: r"has no manifest.json: it is incomplete",
    truncated_trainer_pt: r"file trainer.pt is corrupt \(sha256 .* != manifest",
    flipped_byte: r"file trainer.pt is corrupt \(sha256 .* != manifest",
    manifest_not_json: r"manifest.json is corrupt \(",
    manifest_without_files: r"manifest.json is corrupt \(no 'files' mapping\)",
    file_missing: r"file config.yaml listed in the manifest is missing",
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=lambda f: f.__name__)
def test_auto_skips_a_damaged_newest_checkpoint_and_keeps_it(tmp_path, damage):
    older, newest = save(tmp_path, 2, 3)
    damage(newest)
    warnings = Warnings()
    assert ckpt.resolve_resume(tmp_path, "auto", warn=warnings) == older
    assert len(warnings) == 1 and str(newest) in warnings[0]
    assert "It is left in place" in warnings[0]
    assert re.search(DAMAGE[damage], warnings[0]), warnings[0]
    assert newest.is_dir(), "a skipped checkpoint must not be deleted"
    # Named explicitly, the same checkpoint stops the run with the same reason.
    with pytest.raises(ckpt.CheckpointError, match=DAMAGE[damage]):
        ckpt.resolve_resume(tmp_path, str(newest))


def test_auto_walks_back_past_several_damaged_checkpoints(tmp_path):
    first, second, third = save(tmp_path, 1, 2, 3)
    flipped_byte(third)
    no_manifest(second)
    warnings = Warnings()
    assert ckpt.resolve_resume(tmp_path, "auto", warn=warnings) == first
    assert [str(third) in warnings[0], str(second) in warnings[1]] == [True, True]


def test_auto_refuses_to_start_over_when_no_checkpoint_verifies(tmp_path):
    (only,) = save(tmp_path, 4)
    flipped_byte(only)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"(?s)none of the 1 checkpoint\(s\) in .* verifies, so the run cannot resume "
                             r"\(nothing was deleted\):.*trainer.pt is corrupt.*--overwrite"):
        ckpt.resolve_resume(tmp_path, "auto", warn=None)
    assert only.is_dir()


def test_auto_without_checkpoints_starts_fresh_and_none_ignores_them(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "auto") is None
    save(tmp_path, 1)
    assert ckpt.resolve_resume(tmp_path, "none") is None


def test_leftover_temp_dir_of_a_killed_save_is_ignored_with_a_warning(tmp_path):
    (good,) = save(tmp_path, 2)
    leftover = ckpt.checkpoint_root(tmp_path) / ".step_00000004.tmp"
    leftover.mkdir()
    (leftover / "trainer.pt").write_bytes(b"half")
    warnings = Warnings()
    assert ckpt.resolve_resume(tmp_path, "auto", warn=warnings) == good
    assert len(warnings) == 1 and str(leftover) in warnings[0] and "interrupted" in warnings[0]
    assert leftover.is_dir()
    save(tmp_path, 4)  # the save of that step replaces the leftover
    assert not leftover.exists() and ckpt.latest_checkpoint(tmp_path).name == "step_00000004"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", r"checkpoint.resume = '.*missing': no such directory; use 'auto', 'none' or"),
    (lambda p: (p / "f").write_text("x") and p / "f", r"checkpoint.resume = '.*f' is a file"),
    (lambda p: p, r"is a run directory, not a checkpoint; name one of its checkpoints, e.g. "
                  r"checkpoint.resume=.*step_00000001"),
])
def test_explicit_path_that_is_no_checkpoint_is_a_config_error(tmp_path, make, message):
    save(tmp_path, 1)
    with pytest.raises(ConfigError, match=message):
        ckpt.resolve_resume(tmp_path / "other", str(make(tmp_path)))


def test_full_disk_during_save_removes_partial_files_and_keeps_the_previous(tmp_path, monkeypatch):
    (good,) = save(tmp_path, 2)

    def disk_full(directory: Path) -> None:
        (directory / "trainer.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises, without a file name

    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, 4, disk_full, keep_last=1)
    message = str(info.value)
    assert message.startswith(f"saving checkpoint {ckpt.checkpoint_root(tmp_path) / 'step_00000004'} failed: "
                              "No space left on device [ENOSPC]")
    assert "the file system is full" in message
    assert f"the newest earlier checkpoint, {good}, is intact and checkpoint.resume=auto resumes from it" in message
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step_00000002"]
    ckpt.verify_checkpoint(good)


def test_full_disk_while_writing_the_manifest(tmp_path, monkeypatch):
    save(tmp_path, 2)
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "manifest.json.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device.*partial files of step_00000004 "
                                                   r"were removed; the newest earlier checkpoint"):
        ckpt.save_checkpoint(tmp_path, 4, payload(4.0), keep_last=2)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert not any(p.name.endswith(".tmp") for p in ckpt.checkpoint_root(tmp_path).iterdir())


def test_pruning_after_a_resume_past_a_skipped_checkpoint_keeps_the_new_save(tmp_path):
    """Resumed from step 4 because step 8 was damaged: the saves of steps 5 and 6 with
    keep_last=1 must keep step 6, not count (or delete) the skipped step 8."""
    _, eight = save(tmp_path, 4, 8, keep_last=2)
    flipped_byte(eight)
    assert ckpt.resolve_resume(tmp_path, "auto", warn=None).name == "step_00000004"
    save(tmp_path, 5, 6, keep_last=1)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]
    assert ckpt.resolve_resume(tmp_path, "auto", warn=None).name == "step_00000006"
    save(tmp_path, 8, keep_last=1)  # reaching step 8 again replaces the damaged copy
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_00000008"]
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(tmp_path))


def test_metrics_cut_off_by_a_kill_are_dropped_on_resume(tmp_path, caplog):
    """metrics.jsonl of a run killed mid-write: a cut-off line, and steps past the checkpoint."""
    from moe_dist.train.trainer import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n{"step": 3, "loss": 2.8}\n{"step": 4, "lo')
    with caplog.at_level("WARNING"):
        truncate_metrics(path, after_step=2)
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n'
    assert "dropped 1 unreadable line(s), cut off when the run was killed" in caplog.text
    truncate_metrics(path, after_step=0)  # a fresh start in a run directory without checkpoints
    assert path.read_text() == ""


def test_full_disk_while_truncating_metrics_keeps_the_file(tmp_path, monkeypatch):
    from moe_dist.train.trainer import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, "{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="cannot rewrite metrics.jsonl: No space left on device"):
        truncate_metrics(path, after_step=1)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
