"""moe-dist sweep: sweep-file parsing, grid expansion, run names, validation, status, the local
runner (with a stand-in train command) and the Slurm submission (with a stand-in sbatch)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from moe_dist import sweep as sweep_mod
from moe_dist.config import ConfigError, load_config, parse_override
from moe_dist.sweep import (Sweep, SweepRun, check_runs, expand_runs, load_sweep, render_value, run_name,
                            run_status, short_keys)
from moe_dist.train.checkpoint import list_checkpoints

TINY = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.ffn_dim": 64, "model.max_seq_len": 64,
        "moe.every": 1, "moe.expert_ffn_dim": 32, "data.seq_len": 32, "train.steps": 4}


def write_sweep(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_grid_is_the_cartesian_product_in_file_order():
    runs = expand_runs(None, {"moe.num_experts": [4, 8], "moe.router.top_k": [1, 2, 3]})
    assert [r.overrides for r in runs] == [
        {"moe.num_experts": e, "moe.router.top_k": k} for e in (4, 8) for k in (1, 2, 3)]
    assert [r.name for r in runs][:2] == ["num_experts=4,top_k=1", "num_experts=4,top_k=2"]


def test_runs_cross_grid_nested_entries_and_explicit_names():
    runs = expand_runs([{"moe": {"router": {"type": "xmoe"}}}, {"name": "lfb", "moe.router.bias_update_rate": 0.001}],
                       {"train.seed": [0, 1]})
    assert [r.name for r in runs] == ["type=xmoe,seed=0", "type=xmoe,seed=1", "lfb,seed=0", "lfb,seed=1"]
    assert runs[0].overrides == {"moe.router.type": "xmoe", "train.seed": 0}
    assert runs[3].overrides == {"moe.router.bias_update_rate": 0.001, "train.seed": 1}


def test_short_keys_are_the_shortest_unambiguous_suffix():
    assert short_keys(["moe.router.top_k", "model.peer.top_k", "moe.num_experts"]) == {
        "moe.router.top_k": "router.top_k", "model.peer.top_k": "peer.top_k", "moe.num_experts": "num_experts"}
    assert short_keys(["checkpoint.every", "log.every"]) == {"checkpoint.every": "checkpoint.every",
                                                            "log.every": "log.every"}


def test_run_names_are_filesystem_safe_stable_and_bounded():
    short = {"a.x": "x", "a.y": "y"}
    assert run_name({"a.x": 1e-3, "a.y": [4, 4]}, short) == "x=0.001,y=4x4"
    assert run_name({"a.x": "path/to file", "a.y": True}, short) == "x=path_to_file,y=true"
    assert run_name({}, short) == "base"
    long = {"a.x": "v" * 300, "a.y": 1}
    name = run_name(long, short)
    assert len(name) == 100 and name == run_name(dict(long), short)
    assert name != run_name({"a.x": "v" * 300, "a.y": 2}, short)  # the hash tells them apart


def test_two_runs_with_one_directory_are_an_error():
    with pytest.raises(ConfigError, match="would share the directory 'x=a_b'"):
        expand_runs([{"a.x": "a/b"}, {"a.x": "a b"}], None)


@pytest.mark.parametrize("value", ["softmax_topk", "true", "1e-3", "a b", "", "null", 0.001, 1e-5, True,
                                   None, 7, [4, 4], {"k": 1}])
def test_rendered_values_parse_back_unchanged(value):
    key, parsed = parse_override(f"k={render_value(value)}")
    if isinstance(value, float) and isinstance(parsed, str):  # YAML 1.1 reads 1e-05 as a string;
        parsed = float(parsed)                                # the config loader coerces it
    assert parsed == value


def test_load_sweep_resolves_base_next_to_the_file_and_rejects_typos(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 3\n")
    sweep = load_sweep(write_sweep(tmp_path, "name: s\nbase: base.yaml\noverrides: {train.lr: 0.01}\n"
                                             "grid: {moe.num_experts: [2, 4]}\n"))
    assert sweep.base == (tmp_path / "base.yaml").resolve() and sweep.common == {"train.lr": 0.01}
    assert [r.name for r in sweep.runs] == ["num_experts=2", "num_experts=4"]
    assert sweep.override_args(sweep.runs[1]) == ["train.lr=0.01", "moe.num_experts=4"]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['gird'\]"):
        load_sweep(write_sweep(tmp_path, "gird: {a: [1]}\n"))
    with pytest.raises(ConfigError, match="needs a 'grid'"):
        load_sweep(write_sweep(tmp_path, "name: x\n"))
    with pytest.raises(ConfigError, match="grid key 'moe.num_experts' must map to a non-empty list"):
        load_sweep(write_sweep(tmp_path, "grid: {moe.num_experts: 4}\n"))


def _sweep(runs, world_size=1, common=TINY):
    return Sweep(name="t", base=sweep_mod.DEFAULT_BASE, common=dict(common), runs=runs, world_size=world_size)


def test_validation_names_every_bad_run_and_key_before_anything_starts(tmp_path):
    runs = expand_runs([{"moe.num_experts": 1, "moe.router.top_k": 2}, {"moe.num_experts": 4},
                        {"moe.num_experts": 6, "parallel.ep": 4}, {"moe.nu_experts": 3}], None)
    with pytest.raises(ConfigError) as info:
        check_runs(_sweep(runs, world_size=4, common={**TINY, "train.micro_batch_size": 4}), tmp_path)
    text = str(info.value)
    assert "3 of 4 run(s) are invalid, nothing was started" in text
    assert "run 'num_experts=1,top_k=2': moe.router.top_k (2) cannot exceed moe.num_experts (1)" in text
    assert "run 'num_experts=6,ep=4': moe.num_experts (6) must be divisible by parallel.ep (4)" in text
    assert "run 'nu_experts=3': unknown config key 'moe.nu_experts'" in text
    assert "num_experts=4'" not in text.replace("num_experts=4,", "")
    assert not any(tmp_path.iterdir())


def test_validation_refuses_a_directory_of_another_run(tmp_path):
    sweep = _sweep(expand_runs([{"moe.num_experts": 4}], None))
    other = load_config(sweep.base, sweep.override_args(sweep.runs[0]) + ["train.lr=0.5"])
    (tmp_path / "num_experts=4").mkdir()
    (tmp_path / "num_experts=4" / "config.yaml").write_text(other.to_yaml())
    with pytest.raises(ConfigError, match=r"run 'num_experts=4': .* other values of \['train.lr'\]"):
        check_runs(sweep, tmp_path)
    same = load_config(sweep.base, sweep.override_args(sweep.runs[0]) + ["train.steps=9"])  # resumable key
    (tmp_path / "num_experts=4" / "config.yaml").write_text(same.to_yaml())
    assert list(check_runs(sweep, tmp_path)) == ["num_experts=4"]


def fake_checkpoint(run_dir: Path, step: int) -> None:
    directory = run_dir / "checkpoints" / f"step_{step:08d}"
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))


def test_status_agrees_with_the_checkpoint_module(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "step_00000012").mkdir()  # no manifest: incomplete
    assert sweep_mod.checkpoint_steps(tmp_path) == [step for step, _ in list_checkpoints(tmp_path)] == [2, 10]


def test_status_finished_resume_new(tmp_path):
    cfg = load_config(None, ["train.steps=4"])
    assert run_status(tmp_path / "a", cfg) == "new"
    fake_checkpoint(tmp_path / "a", 2)
    (tmp_path / "a" / "checkpoints" / ".step_00000004.tmp").mkdir()  # an interrupted save
    assert run_status(tmp_path / "a", cfg) == "resume@2"
    fake_checkpoint(tmp_path / "a", 4)
    assert run_status(tmp_path / "a", cfg) == "finished"
    assert run_status(tmp_path / "a", load_config(None, ["train.steps=8"])) == "resume@4"


def test_local_runner_skips_finished_runs_and_survives_a_crash(tmp_path, monkeypatch, capsys):
    runs = expand_runs([{"moe.num_experts": 2}, {"moe.num_experts": 4}, {"moe.num_experts": 8}], None)
    sweep = _sweep(runs)
    fake_checkpoint(tmp_path / runs[0].name, 4)  # finished
    fake_checkpoint(tmp_path / runs[1].name, 2)  # interrupted
    started = tmp_path / "started.txt"
    # Stand-in for `moe-dist train`: records which run started, and the 4-expert run crashes.
    script = ("import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); "
              "sys.exit(3 if sys.argv[2].endswith('=4') else 0)")
    monkeypatch.setattr(sweep_mod, "train_command",
                        lambda sw, run, run_dir: [sys.executable, "-c", script, str(started), run.name])
    code = sweep_mod.run_local(sweep, tmp_path, check_runs(sweep, tmp_path))
    out = capsys.readouterr().out
    assert code == 1
    assert started.read_text().split() == ["num_experts=4", "num_experts=8"]
    assert "num_experts=2: finished, skipped" in out and "num_experts=4: resume from step 2" in out
    assert "num_experts=4: FAILED with exit code 3" in out and "num_experts=8: done in" in out
    assert "1 run(s) failed: num_experts=4" in out
    assert (tmp_path / "logs" / "num_experts=4.log").is_file()


def test_train_command_uses_torchrun_for_several_processes(tmp_path):
    run = SweepRun("n", {"moe.num_experts": 4})
    single = sweep_mod.train_command(_sweep([run]), run, tmp_path / "n")
    assert single[1:6] == ["-m", "moe_dist.cli", "train", "--config", str(sweep_mod.DEFAULT_BASE)]
    assert single[-1] == "moe.num_experts=4" and "--run-dir" in single
    multi = sweep_mod.train_command(_sweep([run], world_size=4), run, tmp_path / "n")
    assert multi[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]


def test_slurm_submits_an_array_of_the_unfinished_runs(tmp_path, monkeypatch, capsys):
    runs = expand_runs(None, {"moe.num_experts": [2, 4, 8]})
    sweep = _sweep(runs, common={**TINY, "train.lr": 0.01})
    out = tmp_path / "out"
    fake_checkpoint(out / runs[1].name, 4)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.json"
    (bin_dir / "sbatch").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'SWEEP_FILE': os.environ['SWEEP_FILE'], "
        f"'RUN_DIR': os.environ['RUN_DIR']}}, open({str(record)!r}, 'w'))\nprint('4242;cluster')\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert sweep_mod.submit_slurm(sweep, out, check_runs(sweep, out, for_slurm=True), ["--gpus-per-node=0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "4242"
    sent = json.loads(record.read_text())
    assert "--array=0,2" in sent["argv"] and "--gpus-per-node=0" in sent["argv"]
    assert sent["argv"][-3:] == [str(sweep_mod.SWEEP_SBATCH), "--config", str(sweep_mod.DEFAULT_BASE)]
    lines = [line for line in Path(sent["SWEEP_FILE"]).read_text().splitlines() if not line.startswith("#")]
    assert lines[2].split() == sweep.override_args(runs[2]) and lines[2].endswith("moe.num_experts=8")
    for index, run in enumerate(runs):  # array task i trains into the run's named directory
        assert (Path(sent["RUN_DIR"]) / str(index)).resolve() == (out / run.name).resolve()


def test_slurm_rejects_values_with_spaces(tmp_path):
    sweep = _sweep(expand_runs([{"data.source": "my corpus.txt"}], None))
    with pytest.raises(ConfigError, match="run 'source=my_corpus.txt': override .* holds whitespace"):
        check_runs(sweep, tmp_path, for_slurm=True)


def test_command_line_overrides_reach_every_run_but_not_swept_keys(tmp_path, capsys):
    from moe_dist.cli import main

    path = write_sweep(tmp_path, f"base: {sweep_mod.DEFAULT_BASE}\noverrides: {{train.steps: 60, log.every: 5}}\n"
                                 "grid: {moe.num_experts: [2, 4]}\n")
    code = main(["sweep", "--config", str(path), "--out", str(tmp_path / "out"), "--dry-run", "train.steps=10",
                 "model.dim=64"])
    assert code == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if " moe_dist.cli train " in line]
    assert len(commands) == 2
    for command, experts in zip(commands, (2, 4)):  # the command line wins over the file's overrides
        assert command.endswith(f"log.every=5 train.steps=10 model.dim=64 moe.num_experts={experts}")
    with pytest.raises(ConfigError, match=r"override 'moe.num_experts=8': moe.num_experts is swept by the sweep "
                                          r"file \(runs num_experts=2, num_experts=4\)"):
        sweep_mod.apply_overrides(load_sweep(path), ["moe.num_experts=8"])


def test_a_run_entry_can_have_its_own_base_config(tmp_path):
    configs = Path(sweep_mod.REPO_ROOT) / "configs"
    path = write_sweep(tmp_path, f"base: {configs / 'tiny.yaml'}\n"
                                 "runs:\n  - {name: plain}\n"
                                 f"  - {{name: sh, base: {configs / 'switchhead.yaml'}, model.switchhead.top_k: 1}}\n")
    sweep = load_sweep(path)
    plain, sh = sweep.runs
    assert plain.base is None and sh.base == configs / "switchhead.yaml"
    assert sweep_mod.train_command(sweep, sh, tmp_path / "sh")[5] == str(configs / "switchhead.yaml")
    assert sweep_mod.train_command(sweep, plain, tmp_path / "p")[5] == str(configs / "tiny.yaml")
    loaded = check_runs(sweep, tmp_path)
    assert loaded["sh"].model.arch == "switchhead" and loaded["sh"].model.switchhead.top_k == 1
    assert loaded["plain"].model.arch == "transformer"
    with pytest.raises(ConfigError, match="run 'sh' has its own base .* Slurm array"):
        check_runs(sweep, tmp_path, for_slurm=True)
    relative = write_sweep(tmp_path, "runs:\n  - {base: nowhere.yaml}\n")
    with pytest.raises(ConfigError, match=r"runs\[0\]: base .*nowhere.yaml' is not a config file"):
        load_sweep(relative)


def test_seeds_repeat_every_run_seed_by_seed(tmp_path):
    path = write_sweep(tmp_path, "runs:\n  - {name: a}\n  - {name: b, moe.num_experts: 4}\nseeds: [0, 7]\n")
    runs = load_sweep(path).runs
    assert [run.name for run in runs] == ["a,seed=0", "b,seed=0", "a,seed=7", "b,seed=7"]
    assert [run.overrides.get("train.seed") for run in runs] == [0, 0, 7, 7]
    assert runs[3].overrides == {"moe.num_experts": 4, "train.seed": 7}
    for bad in ("[]", "[0, 0]", "[1.5]", "3"):
        with pytest.raises(ConfigError, match="seeds .* must be a non-empty list of distinct integers"):
            load_sweep(write_sweep(tmp_path, f"runs: [{{name: a}}]\nseeds: {bad}\n"))
    with pytest.raises(ConfigError, match="run\\(s\\) seed=1 set train.seed, which 'seeds' sets"):
        load_sweep(write_sweep(tmp_path, "grid: {train.seed: [1]}\nseeds: [0]\n"))


def _stand_in(monkeypatch, script: str) -> None:
    """`moe-dist train` replaced by a Python snippet that gets the run's name as argv[1]."""
    monkeypatch.setattr(sweep_mod, "train_command",
                        lambda sw, run, run_dir: [sys.executable, "-c", script, run.name])


def test_parallel_runner_overlaps_runs_and_records_every_outcome(tmp_path, monkeypatch, capsys):
    runs = expand_runs([{"name": "ok1"}, {"name": "ok2"}, {"name": "crash"}, {"name": "slow"}], None)
    sweep = _sweep(runs)
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    # Each stand-in writes its start and end time; 'crash' exits 5, 'slow' outlives the run timeout.
    script = (f"import sys, time; name = sys.argv[1]; p = {str(stamps)!r} + '/' + name; "
              "open(p + '.start', 'w').write(repr(time.time())); "
              "time.sleep(60 if name == 'slow' else 2.5); "
              "open(p + '.end', 'w').write(repr(time.time())); sys.exit(5 if name == 'crash' else 0)")
    _stand_in(monkeypatch, script)
    started = time.monotonic()
    code = sweep_mod.run_local(sweep, tmp_path, check_runs(sweep, tmp_path), parallel=4, run_timeout=5)
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 1
    assert elapsed < 20  # 'slow' was stopped, not waited for
    starts = {name: float((stamps / f"{name}.start").read_text()) for name in ("ok1", "ok2", "crash", "slow")}
    ends = {name: float((stamps / f"{name}.end").read_text()) for name in ("ok1", "ok2", "crash")}
    assert max(starts.values()) < min(ends.values())  # all four were running at once
    assert not (stamps / "slow.end").exists()
    status = json.loads((tmp_path / "sweep_status.json").read_text())
    assert {name: entry["status"] for name, entry in status.items()} == {
        "ok1": "done", "ok2": "done", "crash": "failed", "slow": "timeout"}
    assert status["crash"]["exit_code"] == 5 and status["slow"]["reason"] == "run timeout 5 s"
    assert "crash: FAILED with exit code 5" in out and "slow: TIMEOUT: stopped after" in out
    assert "2 run(s) failed: crash, slow" in out


def test_time_limit_stops_running_runs_and_starts_no_more(tmp_path, monkeypatch, capsys):
    runs = expand_runs([{"name": "a"}, {"name": "b"}, {"name": "c"}], None)
    sweep = _sweep(runs)
    _stand_in(monkeypatch, "import time; time.sleep(60)")
    started = time.monotonic()
    code = sweep_mod.run_local(sweep, tmp_path, check_runs(sweep, tmp_path), parallel=2, time_limit=2)
    assert time.monotonic() - started < 20
    status = json.loads((tmp_path / "sweep_status.json").read_text())
    assert code == 1
    assert {name: entry["status"] for name, entry in status.items()} == {
        "a": "timeout", "b": "timeout", "c": "not_started"}
    out = capsys.readouterr().out
    assert "c: NOT STARTED: the sweep's time limit (2 s) has passed" in out


def test_parallel_options_are_checked(tmp_path, capsys):
    from moe_dist.cli import main

    path = write_sweep(tmp_path, f"base: {sweep_mod.DEFAULT_BASE}\nruns: [{{name: a}}]\n")
    for args, message in ((["--parallel", "0"], "--parallel (0) must be >= 1"),
                          (["--slurm", "--parallel", "2"], "--parallel, --run-timeout and --time-limit apply to local")):
        assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "o"), "--dry-run", *args]) == 2
        assert message in capsys.readouterr().err


def test_only_selects_runs_and_batches_keep_each_others_status(tmp_path, monkeypatch, capsys):
    """A sweep run in two batches (--only): the second batch's status file still lists the
    first batch's runs, and its own runs replace their entries."""
    path = write_sweep(tmp_path, "runs:\n  - {name: a}\n  - {name: b, moe.num_experts: 4}\nseeds: [0, 1]\n")
    sweep = load_sweep(path)
    sweep_mod.select_runs(sweep, ["b,*", "a,seed=1"])
    assert [run.name for run in sweep.runs] == ["b,seed=0", "a,seed=1", "b,seed=1"]
    with pytest.raises(ConfigError, match=r"--only \['c\*'\] matches no run of sweep .*a,seed=0, b,seed=0"):
        sweep_mod.select_runs(load_sweep(path), ["c*"])

    _stand_in(monkeypatch, "import sys; sys.exit(3 if sys.argv[1] == 'a,seed=0' else 0)")
    first = load_sweep(path)
    sweep_mod.select_runs(first, ["a,seed=0"])
    assert sweep_mod.run_local(first, tmp_path, check_runs(first, tmp_path)) == 1
    second = load_sweep(path)
    sweep_mod.select_runs(second, ["b,*"])
    assert sweep_mod.run_local(second, tmp_path, check_runs(second, tmp_path)) == 0
    status = json.loads((tmp_path / "sweep_status.json").read_text())
    assert {name: entry["status"] for name, entry in status.items()} == {
        "a,seed=0": "failed", "b,seed=0": "done", "b,seed=1": "done"}
