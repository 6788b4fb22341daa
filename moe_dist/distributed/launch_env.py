"""Launcher contract: read rank, world size and rendezvous address from whichever launcher ran us.

This is the only module that reads launcher environment variables. Supported launchers, in the
order of precedence used when several leave variables behind:

1. **torchrun / deepspeed launcher**: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``LOCAL_WORLD_SIZE`` (deepspeed: ``LOCAL_SIZE``), ``GROUP_RANK`` (deepspeed: ``CROSS_RANK``),
   ``MASTER_ADDR``, ``MASTER_PORT``. These win because ``srun torchrun ...`` inside an sbatch job
   sets both the torchrun and the Slurm variables, and torchrun's describe the real worker.
2. **OpenMPI mpirun**: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE,NODE_RANK}``. The
   master address and port come from ``MASTER_ADDR``/``MASTER_PORT`` if the user exported both,
   else rank 0 picks its host and a free port and broadcasts them through mpi4py
   (:func:`agree_master_via_mpi`).
3. **Slurm srun**: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS``
   wins inside a step), ``SLURM_NODEID``, tasks per node from ``SLURM_STEP_TASKS_PER_NODE`` /
   ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"`` form) or ``SLURM_NTASKS_PER_NODE``, master = first host
   of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (expanded by :func:`expand_hostlist`), port
   from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``.
4. **Nothing**: a single process, rank 0 of 1.

A missing or contradictory environment raises :class:`LaunchError` listing what was found.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "slurm", "single")

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "LOCAL_SIZE", "CROSS_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_OMPI_KEYS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_NODE_RANK")
_SLURM_KEYS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "SLURM_NODEID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
               "SLURM_STEP_TASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
               "SLURM_JOB_ID")

SLURM_PORT_BASE = 20000
"""Ports derived from SLURM_JOB_ID fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN)."""
SLURM_PORT_SPAN = 20000


class LaunchError(RuntimeError):
    """The launcher environment is missing a variable or contradicts itself."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    """TCP port of the rendezvous store. 0 (single process only) lets the OS pick one."""
    launcher: str
    """One of LAUNCHERS: which environment this was read from."""

    def __post_init__(self) -> None:
        problems = []
        if self.world_size < 1:
            problems.append(f"world_size ({self.world_size}) must be >= 1")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank ({self.rank}) must be in [0, world_size={self.world_size})")
        if self.local_world_size < 1 or self.local_world_size > self.world_size:
            problems.append(f"local_world_size ({self.local_world_size}) must be in "
                            f"[1, world_size={self.world_size}]")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            problems.append(f"local_rank ({self.local_rank}) must be in "
                            f"[0, local_world_size={self.local_world_size})")
        if self.node_rank < 0:
            problems.append(f"node_rank ({self.node_rank}) must be >= 0")
        if not 0 <= self.master_port < 65536:
            problems.append(f"master_port ({self.master_port}) must be in [0, 65535]")
        if self.launcher not in LAUNCHERS:
            problems.append(f"launcher ({self.launcher!r}) must be one of {LAUNCHERS}")
        if problems:
            raise LaunchError(f"inconsistent {self.launcher} launch environment: " + "; ".join(problems))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls) -> LaunchEnv:
        """One process, no launcher."""
        return cls(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                   master_addr="127.0.0.1", master_port=0, launcher="single")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *,
                     agree_master: Callable[[], tuple[str, int]] | None = None) -> LaunchEnv:
        """Detect the launcher from `environ` (default ``os.environ``).

        `agree_master` returns (address, port) for mpirun when MASTER_ADDR/MASTER_PORT are not
        both set; it defaults to :func:`agree_master_via_mpi` (a collective over MPI_COMM_WORLD,
        so every rank must call ``from_environ``).
        """
        env = os.environ if environ is None else environ
        if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            return _from_torchrun(env)
        if any(k in env for k in _OMPI_KEYS):
            return _from_ompi(env, agree_master or agree_master_via_mpi)
        if "SLURM_PROCID" in env:
            return _from_slurm(env)
        return cls.single()


# --------------------------------------------------------------------------------------------
# Per-launcher readers
# --------------------------------------------------------------------------------------------

def _found(env: Mapping[str, str], keys: tuple[str, ...]) -> str:
    present = {k: env[k] for k in keys if k in env}
    return ", ".join(f"{k}={v!r}" for k, v in present.items()) or "none of " + ", ".join(keys)


def _int(env: Mapping[str, str], key: str, keys: tuple[str, ...], launcher: str,
         default: int | None = None) -> int:
    if key not in env:
        if default is not None:
            return default
        raise LaunchError(f"{launcher} launch: {key} is not set (found: {_found(env, keys)}); "
                          f"start with a supported launcher or set {key}")
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"{launcher} launch: {key}={env[key]!r} is not an integer "
                          f"(found: {_found(env, keys)})") from None


def _build(env: Mapping[str, str], keys: tuple[str, ...], **fields: object) -> LaunchEnv:
    try:
        return LaunchEnv(**fields)  # type: ignore[arg-type]
    except LaunchError as exc:
        raise LaunchError(f"{exc} (found: {_found(env, keys)})") from None


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    keys = _TORCHRUN_KEYS
    # The deepspeed launcher sets LOCAL_SIZE / CROSS_RANK where torchrun sets
    # LOCAL_WORLD_SIZE / GROUP_RANK.
    launcher = "deepspeed" if "CROSS_RANK" in env or "LOCAL_SIZE" in env else "torchrun"
    rank = _int(env, "RANK", keys, launcher)
    world = _int(env, "WORLD_SIZE", keys, launcher)
    local_rank = _int(env, "LOCAL_RANK", keys, launcher, default=rank if world == 1 else None)
    size_key = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "LOCAL_SIZE"
    local_world = _int(env, size_key, keys, launcher, default=world)
    node_key = "GROUP_RANK" if "GROUP_RANK" in env else "CROSS_RANK"
    node_rank = _int(env, node_key, keys, launcher, default=rank // max(local_world, 1))
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise LaunchError(f"{launcher} launch with WORLD_SIZE={world} needs MASTER_ADDR and "
                          f"MASTER_PORT (found: {_found(env, keys)})")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT", keys, launcher, default=0)
    return _build(env, keys, rank=rank, world_size=world, local_rank=local_rank,
                  local_world_size=local_world, node_rank=node_rank, master_addr=addr,
                  master_port=port, launcher=launcher)


def _from_ompi(env: Mapping[str, str], agree_master: Callable[[], tuple[str, int]]) -> LaunchEnv:
    keys = _OMPI_KEYS + ("MASTER_ADDR", "MASTER_PORT")
    rank = _int(env, "OMPI_COMM_WORLD_RANK", keys, "mpirun")
    world = _int(env, "OMPI_COMM_WORLD_SIZE", keys, "mpirun")
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", keys, "mpirun")
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", keys, "mpirun")
    node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK", keys, "mpirun",
                     default=rank // max(local_world, 1))
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT", keys, "mpirun")
    else:
        addr, port = agree_master()
    return _build(env, keys, rank=rank, world_size=world, local_rank=local_rank,
                  local_world_size=local_world, node_rank=node_rank, master_addr=addr,
                  master_port=port, launcher="mpirun")


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    keys = _SLURM_KEYS + ("MASTER_ADDR", "MASTER_PORT")
    rank = _int(env, "SLURM_PROCID", keys, "slurm")
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int(env, world_key, keys, "slurm")
    local_rank = _int(env, "SLURM_LOCALID", keys, "slurm")
    node_rank = _int(env, "SLURM_NODEID", keys, "slurm")
    local_world = _slurm_local_world_size(env, node_rank, keys)
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchError("slurm launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set "
                              f"(found: {_found(env, keys)})")
        try:
            addr = expand_hostlist(nodelist)[0]
        except ValueError as exc:
            raise LaunchError(f"slurm launch: {exc} (found: {_found(env, keys)})") from None
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT", keys, "slurm")
    elif "SLURM_JOB_ID" in env:
        port = slurm_port(_int(env, "SLURM_JOB_ID", keys, "slurm"))
    else:
        raise LaunchError("slurm launch: set MASTER_PORT (or run inside a job with SLURM_JOB_ID) "
                          f"(found: {_found(env, keys)})")
    return _build(env, keys, rank=rank, world_size=world, local_rank=local_rank,
                  local_world_size=local_world, node_rank=node_rank, master_addr=addr,
                  master_port=port, launcher="slurm")


def _slurm_local_world_size(env: Mapping[str, str], node_rank: int, keys: tuple[str, ...]) -> int:
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if key in env:
            try:
                per_node = expand_tasks_per_node(env[key])
            except ValueError as exc:
                raise LaunchError(f"slurm launch: {key}: {exc} (found: {_found(env, keys)})") from None
            if node_rank >= len(per_node):
                if len(per_node) == 1:  # SLURM_NTASKS_PER_NODE is a single number for every node
                    return per_node[0]
                raise LaunchError(f"slurm launch: SLURM_NODEID={node_rank} but {key}={env[key]!r} "
                                  f"describes {len(per_node)} nodes (found: {_found(env, keys)})")
            return per_node[node_rank]
    raise LaunchError("slurm launch: cannot tell tasks per node; none of SLURM_TASKS_PER_NODE, "
                      f"SLURM_NTASKS_PER_NODE is set (found: {_found(env, keys)})")


def slurm_port(job_id: int) -> int:
    """A rendezvous port every task of a job derives identically from its SLURM_JOB_ID."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# --------------------------------------------------------------------------------------------
# Slurm list syntax
# --------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unmatched '[' in hostlist {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, whole: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding of the lower bound is kept)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise ValueError(f"bad range {item!r} in hostlist {whole!r}")
        lo_text, hi_text = match.group(1), match.group(2)
        if hi_text is None:
            out.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"descending range {item!r} in hostlist {whole!r}")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def _expand_pattern(pattern: str, whole: str) -> list[str]:
    """'rack[1-2]-n[01-02]' -> every combination, leftmost bracket varying slowest."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + value + rest
            for value in _expand_range_list(match.group(1), whole)
            for rest in _expand_pattern(tail, whole)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: ``'node[01-03,7],gpu5'`` -> node01 node02 node03 node7 gpu5."""
    hosts = [host for part in _split_top_level(nodelist) for host in _expand_pattern(part, nodelist)]
    if not hosts:
        raise ValueError(f"hostlist {nodelist!r} names no hosts")
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """Expand Slurm's tasks-per-node syntax: ``'2(x3),1'`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"cannot parse tasks-per-node {text!r} (expected e.g. '2(x3),1')")
        out.extend([int(match.group(1))] * int(match.group(2) or 1))
    return out


# --------------------------------------------------------------------------------------------
# Rendezvous helpers
# --------------------------------------------------------------------------------------------

def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def agree_master_via_mpi() -> tuple[str, int]:
    """Collective over MPI_COMM_WORLD: rank 0 picks its host and a free port, everyone gets them.

    mpi4py is imported here, not at module import, so torchrun/Slurm runs do not need MPI.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchError("launched by mpirun (OMPI_COMM_WORLD_* are set) but mpi4py cannot be "
                          f"imported ({exc}); pip install mpi4py, or export MASTER_ADDR and "
                          "MASTER_PORT with mpirun -x") from exc
    comm = MPI.COMM_WORLD
    chosen: tuple[str, int] | None = None
    if comm.Get_rank() == 0:
        host = socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = host
        chosen = (addr, free_port())
    agreed = comm.bcast(chosen, root=0)
    return str(agreed[0]), int(agreed[1])


def default_backend() -> str:
    """NCCL when CUDA is usable, gloo otherwise."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(env: LaunchEnv, backend: str | None = None,
                       timeout: datetime.timedelta | float = 300.0) -> str:
    """Initialise the default process group from `env` over ``tcp://addr:port``.

    `backend` None picks NCCL with CUDA, gloo otherwise. On NCCL the CUDA device is set to
    ``env.local_rank`` first. `timeout` (seconds or a timedelta) bounds every collective on the
    default group and on groups created from it (see distributed.agreement). Returns the backend.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        raise LaunchError("init_process_group called twice; the default process group already exists "
                          f"(rank {dist.get_rank()} of {dist.get_world_size()})")
    chosen = backend or default_backend()
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise LaunchError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False; "
                              "use backend='gloo'")
        if env.local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local_rank {env.local_rank} has no GPU: only "
                              f"{torch.cuda.device_count()} visible; start at most that many "
                              "processes per node")
        torch.cuda.set_device(env.local_rank)
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=float(timeout))
    port = env.master_port
    if port == 0:
        if env.world_size > 1:
            raise LaunchError(f"master_port 0 with world_size {env.world_size}: every rank must "
                              "know the port; set MASTER_PORT")
        port = free_port(env.master_addr)
    dist.init_process_group(chosen, init_method=f"tcp://{env.master_addr}:{port}",
                            rank=env.rank, world_size=env.world_size, timeout=timeout)
    return chosen
