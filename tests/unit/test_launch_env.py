"""LaunchEnv parsing for every launcher, hostlist forms and error messages (no processes)."""

from __future__ import annotations

import pytest

from moe_dist.distributed.launch_env import (
    LaunchEnv,
    LaunchError,
    expand_hostlist,
    expand_tasks_per_node,
    slurm_port,
)


def _no_mpi() -> tuple[str, int]:
    raise AssertionError("agree_master must not be called here")


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "abc"}
SLURM = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "4242"}
OMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "OMPI_COMM_WORLD_NODE_RANK": "2"}


def test_torchrun():
    env = LaunchEnv.from_environ(TORCHRUN, agree_master=_no_mpi)
    assert env == LaunchEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1,
                            master_addr="10.0.0.1", master_port=29500, launcher="torchrun")
    assert env.is_distributed


def test_deepspeed_launcher_names():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
               "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29600"}
    env = LaunchEnv.from_environ(environ, agree_master=_no_mpi)
    assert (env.launcher, env.rank, env.local_world_size, env.node_rank) == ("deepspeed", 3, 2, 1)
    assert (env.master_addr, env.master_port) == ("h0", 29600)


def test_torchrun_inside_slurm_wins():
    env = LaunchEnv.from_environ({**SLURM, **TORCHRUN, **OMPI}, agree_master=_no_mpi)
    assert env.launcher == "torchrun" and env.rank == 5 and env.world_size == 8


def test_ompi_with_mpi_agreement_and_precedence_over_slurm():
    calls = []

    def agree() -> tuple[str, int]:
        calls.append(1)
        return "192.0.2.7", 31337

    env = LaunchEnv.from_environ({**SLURM, **OMPI}, agree_master=agree)
    assert calls == [1]
    assert env == LaunchEnv(rank=2, world_size=3, local_rank=0, local_world_size=1, node_rank=2,
                            master_addr="192.0.2.7", master_port=31337, launcher="mpirun")


def test_ompi_uses_exported_master_without_mpi():
    env = LaunchEnv.from_environ({**OMPI, "MASTER_ADDR": "h1", "MASTER_PORT": "1234"},
                                 agree_master=_no_mpi)
    assert (env.master_addr, env.master_port) == ("h1", 1234)


def test_slurm():
    env = LaunchEnv.from_environ(SLURM, agree_master=_no_mpi)
    assert env == LaunchEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1,
                            master_addr="node01", master_port=20000 + 4242 % 20000,
                            launcher="slurm")
    assert slurm_port(4242) == env.master_port


def test_slurm_uneven_nodes_step_vars_and_master_port():
    environ = {**SLURM, "SLURM_NTASKS": "99", "SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "4",
               "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x2),1",
               "SLURM_JOB_NODELIST": "gpu[7-9]", "MASTER_PORT": "29501"}
    env = LaunchEnv.from_environ(environ, agree_master=_no_mpi)
    assert (env.world_size, env.local_world_size, env.node_rank) == (5, 1, 2)
    assert (env.master_addr, env.master_port) == ("gpu7", 29501)


def test_slurm_ntasks_per_node_single_number():
    environ = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    environ["SLURM_NTASKS_PER_NODE"] = "2"
    assert LaunchEnv.from_environ(environ, agree_master=_no_mpi).local_world_size == 2


def test_no_launcher_is_single_process():
    env = LaunchEnv.from_environ({"PATH": "/bin", "MASTER_PORT": "1"}, agree_master=_no_mpi)
    assert env == LaunchEnv.single()
    assert (env.rank, env.world_size, env.launcher, env.is_distributed) == (0, 1, "single", False)


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[098-100],y", ["x098", "x099", "x100", "y"]),
    ("h-1,h-2", ["h-1", "h-2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, match", [
    ("node[1-3", "unmatched"), ("node1-3]", "unmatched"), ("n[3-1]", "descending"),
    ("n[a-b]", "bad range"), ("", "no hosts"),
])
def test_expand_hostlist_errors(text, match):
    with pytest.raises(ValueError, match=match):
        expand_hostlist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("2x3")


@pytest.mark.parametrize("environ, match", [
    ({"RANK": "0"}, r"WORLD_SIZE is not set \(found: RANK='0'\)"),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
     r"rank \(4\) must be in \[0, world_size=4\).*found: RANK='4', WORLD_SIZE='4'"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, r"needs MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2",
      "MASTER_ADDR": "a", "MASTER_PORT": "1"}, r"local_rank \(3\)"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, r"mpirun launch: OMPI_COMM_WORLD_SIZE is not set"),
    ({**SLURM, "SLURM_PROCID": "7"}, r"rank \(7\).*SLURM_PROCID='7'"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}, r"tasks per node"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, r"SLURM_JOB_NODELIST"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, r"MASTER_PORT"),
    ({**SLURM, "SLURM_NODEID": "5"}, r"SLURM_NODEID=5 but SLURM_TASKS_PER_NODE"),
])
def test_launch_errors_name_the_variables(environ, match):
    with pytest.raises(LaunchError, match=match):
        LaunchEnv.from_environ(environ, agree_master=_no_mpi)


def test_init_process_group_single_process_picks_a_port():
    import torch
    import torch.distributed as dist

    from moe_dist.distributed.launch_env import init_process_group

    assert init_process_group(LaunchEnv.single(), backend="gloo", timeout=10.0) == "gloo"
    try:
        t = torch.tensor([2.0])
        dist.all_reduce(t)
        assert t.item() == 2.0 and dist.get_world_size() == 1
        with pytest.raises(LaunchError, match="called twice"):
            init_process_group(LaunchEnv.single(), backend="gloo")
    finally:
        dist.destroy_process_group()


def test_init_process_group_rejects_port_zero_for_many_ranks():
    from moe_dist.distributed.launch_env import init_process_group

    env = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, node_rank=0,
                    master_addr="127.0.0.1", master_port=0, launcher="torchrun")
    with pytest.raises(LaunchError, match="set MASTER_PORT"):
        init_process_group(env, backend="gloo")
