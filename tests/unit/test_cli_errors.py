"""Every failure a user can cause ends in one line naming the cause and the fix, with the exit
status of its kind (``moe_dist.cli.user_error``); a bug keeps its traceback.

These call ``main()`` in this process (no subprocess, no training), with the file system's
failures simulated by monkeypatching; ``tests/smoke/test_train_single.py`` checks a few of them
end to end.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from moe_dist import cli
from moe_dist.cli import main, user_error
from moe_dist.config import ConfigError

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
        "moe.num_experts=4", "moe.expert_ffn_dim=32", "data.seq_len=32", "data.max_documents=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=1", "log.progress_bar=false"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """No launcher variables from the environment running the tests."""
    from moe_dist.distributed import launch_env

    for key in (*launch_env._TORCHRUN_KEYS, *launch_env._OMPI_KEYS, *launch_env._SLURM_KEYS):
        monkeypatch.delenv(key, raising=False)


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("moe-dist: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


# --------------------------------------------------------------------------------------------
# parallel.etp: a bad value is refused by validation, before any process group
# --------------------------------------------------------------------------------------------

def test_bad_etp_is_refused_before_any_process_group(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    from moe_dist.distributed import launch_env

    def no_groups(*_args, **_kwargs):
        raise AssertionError("a process group was created before validation refused parallel.etp")

    monkeypatch.setattr(launch_env, "init_process_group", no_groups)
    monkeypatch.setattr(dist, "init_process_group", no_groups)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29599")
    code, line = run(capsys, "--run-dir", str(tmp_path / "run"), *TINY, "moe.expert_ffn_dim=33", "parallel.etp=2")
    assert code == 2
    assert line == ("moe-dist: config error: moe.expert_ffn_dim (33) must be divisible by parallel.etp (2): each etp "
                    "rank holds ffn/etp columns of every expert; use etp in [1] or moe.expert_ffn_dim=34")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# --config, overrides, launcher environment
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (None, r"config file '.*nope.yaml' does not exist; shipped configs: \[.*'tiny.yaml'"),
    ("dir", r"config file '.*' is a directory; pass a YAML file"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", r"config file '.*c.yaml' is not a text file \(invalid start byte at byte 0\); "
                                  r"pass a YAML file"),
    ("train: [1, 2\n", r"config file '.*c.yaml' is not valid YAML: while parsing a flow sequence, expected ',' "
                       r"or '\]', but got '<stream end>' \(line 2, column 1\)$"),
    ("- a\n- b\n", r"config file '.*c.yaml' must hold a mapping of sections, got list"),
    ("train: 5\n", r"train must be a mapping, got 5"),
    ("train:\n  steps: many\n", r"train.steps = 'many' must be an integer"),
])
def test_bad_config_files(tmp_path, capsys, content, message):
    path = tmp_path / ("nope.yaml" if content is None else "c.yaml")
    if content == "dir":
        path = tmp_path
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, line = run(capsys, "--config", str(path), "--print-config")
    assert code == 2 and line.startswith("moe-dist: config error: ")
    assert re.search(message, line), line


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps = 'abc' must be an integer"),
    ("train.lr=[1]", "train.lr = [1] must be a number"),
    ("moe=3", "moe must be a mapping, got 3"),
    ("parallel.etp=two", "parallel.etp = 'two' must be an integer"),
])
def test_wrong_types_on_the_command_line(capsys, override, message):
    code, line = run(capsys, "--print-config", override)
    assert (code, line) == (2, f"moe-dist: config error: {message}")


def test_launcher_variables_that_contradict_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")  # exported in a shell, without a launcher
    code, line = run(capsys, "--run-dir", str(tmp_path / "run"), *TINY)
    assert code == 2
    assert line.startswith("moe-dist: launch error: torchrun launch: WORLD_SIZE is not set (found: RANK='0')")


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------

def test_run_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, line = run(capsys, "--run-dir", str(tmp_path / "notes.txt"), *TINY)
    assert (code, line) == (2, f"moe-dist: config error: run directory {tmp_path / 'notes.txt'} is a file, not a "
                               "directory; pass --run-dir with a directory path (it is created if missing)")
    code, line = run(capsys, "--run-dir", str(tmp_path / "notes.txt" / "run"), "--overwrite", *TINY)
    assert code == 2 and f"lies below {tmp_path / 'notes.txt'}, which is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --overwrite never deletes it


@pytest.mark.parametrize("content, message", [
    ("a: [\n", r"has a config.yaml that is not valid YAML \(while parsing a flow node, expected the node content, "
               r"but found '<stream end>' \(line 2, column 1\)\); pass --run-dir NEW_DIR"),
    ("- a list\n", r"has a config.yaml that is not a moe_dist config \(a list, not a mapping of sections\)"),
])
def test_run_dir_with_a_broken_config_yaml(tmp_path, capsys, content, message):
    (tmp_path / "config.yaml").write_text(content)
    code, line = run(capsys, "--run-dir", str(tmp_path), *TINY)
    assert code == 2 and re.search(message, line), line


def _fail_for(monkeypatch, method: str, name: str, error: int, strerror: str, with_name: bool) -> None:
    real = getattr(Path, method)

    def failing(self, *args, **kwargs):
        if self.name == name:
            raise OSError(error, strerror, *([str(self)] if with_name else []))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, failing)


def test_read_only_run_dir(tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, "mkdir", "run", errno.EROFS, "Read-only file system", with_name=True)
    code, line = run(capsys, "--run-dir", str(tmp_path / "run"), *TINY)
    assert (code, line) == (4, f"moe-dist: file-system error: Read-only file system [EROFS] ({tmp_path / 'run'}); "
                               "the file system is read-only: point --run-dir / data.cache_dir at a writable one")


def test_permission_denied_run_dir(tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, "mkdir", "run", errno.EACCES, "Permission denied", with_name=True)
    code, line = run(capsys, "--run-dir", str(tmp_path / "run"), *TINY)
    assert code == 4 and line.startswith("moe-dist: file-system error: Permission denied [EACCES] (")
    assert "fix its permissions or choose another --run-dir" in line


def test_full_disk_writing_the_run_config(tmp_path, monkeypatch, capsys):
    _fail_for(monkeypatch, "write_text", "config.yaml.tmp", errno.ENOSPC, "No space left on device", with_name=False)
    code, line = run(capsys, "--run-dir", str(tmp_path / "run"), *TINY)
    assert (code, line) == (4, "moe-dist: file-system error: cannot write config.yaml: No space left on device "
                               f"[ENOSPC] ({tmp_path / 'run' / 'config.yaml'}); the file system is full: free space "
                               "(older runs, fewer checkpoints with checkpoint.keep_last) or point --run-dir / "
                               "data.cache_dir at another file system")
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()


def test_every_rank_stops_when_rank_0_cannot_prepare_the_run_dir(tmp_path):
    """A rank other than 0 learns of rank 0's failure through the agreement that replaces the
    barrier, instead of waiting in the trainer's first collective."""
    from types import SimpleNamespace

    from moe_dist.config import load_config
    from moe_dist.train.entry import train_in_run_dir

    other_rank = SimpleNamespace(is_logging_rank=False, any_rank=lambda flag: True)
    with pytest.raises(ConfigError, match=r"rank 0 could not prepare the run directory .*; its message says why"):
        train_in_run_dir(load_config(None, TINY), other_rank, tmp_path / "run", overwrite=False)


# --------------------------------------------------------------------------------------------
# What is a user error and what is a bug
# --------------------------------------------------------------------------------------------

def test_user_error_kinds_and_exit_codes():
    from moe_dist.distributed.agreement import AgreementError
    from moe_dist.distributed.launch_env import LaunchError
    from moe_dist.train.checkpoint import CheckpointError

    assert user_error(ConfigError("x (1) must be y")) == (2, "config error: x (1) must be y")
    assert user_error(LaunchError("WORLD_SIZE is not set")) == (2, "launch error: WORLD_SIZE is not set")
    assert user_error(AgreementError("ranks disagree")) == (2, "launch error: ranks disagree")
    assert user_error(CheckpointError("checkpoint c is corrupt")) == (4, "checkpoint error: checkpoint c is corrupt")
    assert user_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/x")) == \
        (4, "file-system error: No such file or directory [ENOENT] (/d/x); that path does not exist")
    assert user_error(KeyboardInterrupt())[0] == 130
    for bug in (RuntimeError("boom"), KeyError("k"), AssertionError("invariant"), TypeError("t")):
        assert user_error(bug) is None
    assert (cli.CONFIG_ERROR_EXIT_CODE, cli.FILE_ERROR_EXIT_CODE) == (2, 4)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import moe_dist.train.entry as entry

    def bug(*_args, **_kwargs):
        raise KeyError("an internal invariant")

    monkeypatch.setattr(entry, "run_training", bug)
    with pytest.raises(KeyError, match="an internal invariant"):
        main(["train", "train.steps=1"])


def test_interrupt_is_one_line(monkeypatch, capsys):
    import moe_dist.train.entry as entry

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "run_training", interrupted)
    code, line = run(capsys, "train.steps=1")
    assert code == 130 and line == ("moe-dist: interrupted; checkpoints already written are intact, run the same "
                                    "command to resume from the newest")


def test_os_error_without_errno_is_still_one_line():
    assert user_error(OSError("weird")) == (4, "file-system error: weird")
    assert os.strerror(errno.ENOSPC) == "No space left on device"  # the wording the messages above quote
