"""``moe-dist sweep``: many training runs from one sweep file, locally or as a Slurm job array.

A sweep file (YAML)::

    name: experts                   # default output directory runs/sweeps/<name>
    base: ../tiny.yaml              # base config, relative to the sweep file (or absolute)
    overrides: {train.steps: 60}    # applied to every run (optional)
    runs:                           # a list of override dicts (optional) ...
      - {moe.num_experts: 1, moe.router.top_k: 1}
      - {name: wide, moe.num_experts: 8}   # 'name' sets the directory name explicitly
      - {name: sh, base: ../switchhead.yaml}  # 'base': this run's own base config (optional)
    grid:                           # ... and/or a cartesian product over dotted keys
      moe.router.type: [softmax_topk, sigmoid_topk]
    seeds: [0, 1, 2]                # optional: every run once per train.seed (see below)
    world_size: 1                   # processes per run (local: torchrun when > 1); used to validate

Dotted overrides on the command line are applied to every run, above the file's ``overrides``
(a key the file sweeps cannot be overridden), e.g. a shipped sweep shrunk to 10 steps::

    moe-dist sweep --config configs/sweeps/experts.yaml --out runs/sweeps/experts-short train.steps=10

They do not change the run names, so give such a variant its own ``--out``.

With both ``runs`` and ``grid`` every run entry is combined with every grid point. ``seeds``
repeats every run once per seed (``train.seed``, named ``<run>,seed=<s>``), seed by seed: all
runs of the first seed come first, so a sweep cut short holds whole seeds. Each run
trains into ``<out>/<run name>``, where the name is built from the run's own overrides
(``num_experts=8,top_k=2``): stable across invocations, so a second ``moe-dist sweep`` finds the
same directories, skips the runs that finished (a checkpoint at ``train.steps`` exists) and
resumes the others from their newest checkpoint (``checkpoint.resume=auto``). Every run's config
is loaded and validated before the first one starts.

Locally the runs go one after another, each as its own ``moe-dist train`` process (a crash in
one run does not stop the sweep; its log is ``<out>/logs/<name>.log``). ``--parallel N`` keeps up
to N of them running at once (small models on one GPU are launch-bound, so several share it
well); ``--run-timeout S`` stops a run after S seconds and ``--time-limit S`` stops the whole
sweep after S seconds (runs still going are stopped, runs not yet started are not started).
Every run's outcome (done, failed with its exit code, timeout, not started, skipped) is printed
and written to ``<out>/sweep_status.json``. ``--slurm`` writes one
override line per run to ``<out>/slurm-overrides.txt`` and submits ``slurm/sweep-array.sbatch``
as an array of the unfinished runs; ``<out>/.slurm-index/<i>`` links array task i to its run
directory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_dist.config import Config, ConfigError, load_config, parse_override, validate
from moe_dist.help_text import plain_text

REPO_ROOT = Path(__file__).resolve().parent.parent
SWEEP_SBATCH = REPO_ROOT / "slurm" / "sweep-array.sbatch"
DEFAULT_BASE = REPO_ROOT / "configs" / "tiny.yaml"
_SPEC_KEYS = {"name", "base", "overrides", "grid", "runs", "seeds", "world_size", "slurm"}
_MAX_NAME = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its directory name and its own (swept) overrides."""

    name: str
    overrides: dict[str, Any]
    """Dotted key -> value of this run, in sweep-file order (common overrides excluded)."""
    base: Path | None = None
    """This run's own base config (a run entry's ``base``); None uses the sweep's."""


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    base: Path
    common: dict[str, Any]
    runs: list[SweepRun]
    world_size: int = 1
    slurm_args: list[str] = field(default_factory=list)

    def base_of(self, run: SweepRun) -> Path:
        """The base config file of ``run``: its own, else the sweep's."""
        return run.base or self.base

    def override_args(self, run: SweepRun) -> list[str]:
        """``key=value`` arguments of ``run`` for ``moe-dist train`` (common first, run wins)."""
        merged = {**self.common, **run.overrides}
        return [f"{key}={render_value(value)}" for key, value in merged.items()]


# --------------------------------------------------------------------------------------------
# Parsing: sweep file -> runs
# --------------------------------------------------------------------------------------------

def render_value(value: Any) -> str:
    """A value as text that ``yaml.safe_load`` (the override parser) reads back unchanged."""
    if isinstance(value, str):
        return value if value.strip() == value and _yaml_reads_back(value) else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def _yaml_reads_back(text: str) -> bool:
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def flatten_overrides(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{moe: {num_experts: 4}}`` and ``{moe.num_experts: 4}`` both -> ``{moe.num_experts: 4}``.
    A dict value is a section unless the key is a field holding a mapping (none exist today)."""
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_overrides(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def short_keys(keys: list[str], min_parts: int = 1) -> dict[str, str]:
    """The shortest dotted suffix of each key (``min_parts`` parts or more) that no other key
    ends with."""
    result = {}
    for key in keys:
        parts = key.split(".")
        for length in range(min(min_parts, len(parts)), len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        result[key] = suffix
    return result


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "x".join(_value_text(v) for v in value)
    return str(value)


def run_name(overrides: dict[str, Any], short: dict[str, str]) -> str:
    """Filesystem-safe, stable directory name from a run's overrides."""
    if not overrides:
        return "base"
    text = ",".join(f"{short[key]}={_value_text(value)}" for key, value in overrides.items())
    text = _UNSAFE.sub("_", text)
    if len(text) > _MAX_NAME:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
        text = f"{text[:_MAX_NAME - 9]}-{digest}"
    return text


def expand_runs(runs: list[dict[str, Any]] | None, grid: dict[str, list] | None,
                root: Path | None = None) -> list[SweepRun]:
    """Every run entry crossed with every grid point, named from its overrides. A run entry's
    ``base`` (a config file, relative to ``root``, the sweep file's directory) is its own base."""
    entries = [dict(entry) for entry in (runs or [{}])]
    grid = flatten_overrides(grid or {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid key {key!r} must map to a non-empty list of values, got {values!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    combos = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"sweep runs[{index}] must be a mapping of overrides, got {entry!r}")
        explicit = entry.pop("name", None)
        base = entry.pop("base", None)
        if base is not None:
            base = Path(str(base))
            base = base if base.is_absolute() or root is None else (root / base).resolve()
            if not base.is_file():
                raise ConfigError(f"sweep runs[{index}]: base {str(base)!r} is not a config file")
        for point in points:
            combos.append((explicit, base, {**flatten_overrides(entry), **point}))
    swept = list(dict.fromkeys(key for _, _, overrides in combos for key in overrides))
    short = short_keys(swept)
    result, seen = [], {}
    for explicit, base, overrides in combos:
        grid_part = {key: overrides[key] for key in grid}
        if explicit is not None:
            name = _UNSAFE.sub("_", str(explicit))
            name = f"{name},{run_name(grid_part, short)}" if grid_part else name
        else:
            name = run_name(overrides, short)
        if name in seen:
            raise ConfigError(f"sweep runs {seen[name]} and {overrides} would share the directory {name!r}; "
                              "give one of them a distinct 'name'")
        seen[name] = overrides
        result.append(SweepRun(name, overrides, base))
    return result


def load_sweep(path: str | Path) -> Sweep:
    """Parse a sweep file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; shipped sweeps: "
                          f"{sorted(str(p) for p in (REPO_ROOT / 'configs' / 'sweeps').glob('*.yaml'))}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (name, base, grid/runs)")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {unknown}; valid keys: {sorted(_SPEC_KEYS)}")
    if "grid" not in spec and "runs" not in spec:
        raise ConfigError(f"sweep file {path} needs a 'grid' (key: [values]) or a 'runs' list of overrides")
    name = str(spec.get("name") or path.stem)
    base = Path(spec["base"]) if spec.get("base") else None
    if base is not None and not base.is_absolute():
        base = (path.parent / base).resolve()
    world_size = spec.get("world_size", 1)
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"sweep file {path}: world_size ({world_size!r}) must be a positive integer")
    slurm = spec.get("slurm") or {}
    slurm_args = [str(a) for a in slurm.get("args", [])] if isinstance(slurm, dict) else []
    runs = expand_runs(spec.get("runs"), spec.get("grid"), path.parent)
    if spec.get("seeds") is not None:
        runs = repeat_over_seeds(runs, spec["seeds"], f"sweep file {path}")
    return Sweep(name=_UNSAFE.sub("_", name), base=base or DEFAULT_BASE,
                 common=flatten_overrides(spec.get("overrides") or {}), runs=runs, world_size=world_size,
                 slurm_args=slurm_args)


def repeat_over_seeds(runs: list[SweepRun], seeds: Any, where: str) -> list[SweepRun]:
    """Every run once per seed (train.seed), seed-major; names get ``,seed=<s>``."""
    if (not isinstance(seeds, list) or not seeds or len(set(map(repr, seeds))) != len(seeds)
            or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds)):
        raise ConfigError(f"{where}: seeds ({seeds!r}) must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    fixed = [run.name for run in runs if "train.seed" in run.overrides]
    if fixed:
        raise ConfigError(f"{where}: run(s) {', '.join(fixed[:3])} set train.seed, which 'seeds' sets; "
                          "drop one of the two")
    return [SweepRun(f"seed={seed}" if run.name == "base" else f"{run.name},seed={seed}",
                     {**run.overrides, "train.seed": seed}, run.base) for seed in seeds for run in runs]



def apply_overrides(sweep: Sweep, items: list[str]) -> None:
    """Add command-line ``key=value`` overrides to every run of ``sweep`` (above the file's
    ``overrides``); a ConfigError for a key that the file sweeps."""
    for item in items:
        key, value = parse_override(item)
        swept = [run.name for run in sweep.runs if key in run.overrides]
        if swept:
            raise ConfigError(f"override {item!r}: {key} is swept by the sweep file (runs {', '.join(swept[:3])}"
                              f"{', ...' if len(swept) > 3 else ''}); edit the sweep file's runs/grid instead")
        sweep.common.pop(key, None)
        sweep.common[key] = value


# --------------------------------------------------------------------------------------------
# Status and validation
# --------------------------------------------------------------------------------------------

_CHECKPOINT = re.compile(r"^step_(\d{8})$")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the completed checkpoints in ``run_dir`` (oldest first).

    The layout of ``moe_dist.train.checkpoint`` (``checkpoints/step_XXXXXXXX`` with a
    ``manifest.json`` once complete), read without importing torch so that ``--dry-run`` and
    the status check stay fast.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(match.group(1)) for child in root.iterdir()
                  if (match := _CHECKPOINT.match(child.name)) and (child / "manifest.json").is_file())


def run_status(run_dir: Path, cfg: Config) -> str:
    """'finished' (checkpoint at train.steps), 'resume@N' (newest checkpoint N) or 'new'."""
    steps = checkpoint_steps(run_dir)
    if cfg.train.steps in steps or (steps and steps[-1] > cfg.train.steps):
        return "finished"
    return f"resume@{steps[-1]}" if steps else "new"


def check_runs(sweep: Sweep, out: Path, for_slurm: bool = False) -> dict[str, Config]:
    """Load and validate every run's config; one error listing every bad run (by name)."""
    from moe_dist.train.run_dir import config_differences

    configs, errors = {}, []
    for run in sweep.runs:
        args = sweep.override_args(run)
        try:
            cfg = load_config(sweep.base_of(run), args)
            validate(cfg, sweep.world_size)
        except ConfigError as exc:
            errors.append(f"run {run.name!r}: {exc}")
            continue
        if for_slurm and run.base is not None:
            errors.append(f"run {run.name!r} has its own base ({run.base}), which a Slurm array (one --config "
                          "for every task) cannot carry; run the sweep locally or split it by base config")
        if for_slurm:
            spaced = [arg for arg in args if any(ch.isspace() for ch in arg)]
            if spaced:
                errors.append(f"run {run.name!r}: override {spaced[0]!r} holds whitespace, which a Slurm "
                              "override line cannot carry; use a value without spaces")
        run_dir = out / run.name
        old_config = run_dir / "config.yaml"
        if old_config.is_file():
            different = config_differences(yaml.safe_load(old_config.read_text()) or {}, cfg.to_dict())
            if different:
                errors.append(f"run {run.name!r}: {run_dir} holds a run with other values of {different[:4]}; "
                              "delete that directory or pass --out NEW_DIR")
            elif cfg.checkpoint.resume == "none" and checkpoint_steps(run_dir):
                errors.append(f"run {run.name!r}: checkpoint.resume=none but {run_dir} has checkpoints; "
                              "use checkpoint.resume=auto to resume it")
        configs[run.name] = cfg
    if errors:
        raise ConfigError(f"sweep {sweep.name!r}: {len(errors)} of {len(sweep.runs)} run(s) are invalid, "
                          "nothing was started:\n  " + "\n  ".join(errors))
    return configs


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def train_command(sweep: Sweep, run: SweepRun, run_dir: Path) -> list[str]:
    """The ``moe-dist train`` command of one run (under torchrun when world_size > 1)."""
    train = ["-m", "moe_dist.cli", "train", "--config", str(sweep.base_of(run)), "--run-dir", str(run_dir),
             *sweep.override_args(run)]
    if sweep.world_size == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={sweep.world_size}", *train]


@dataclass
class _Running:
    """A run whose ``moe-dist train`` process is going."""

    run: SweepRun
    prefix: str
    process: subprocess.Popen
    log: Any
    started: float


_PR_SET_PDEATHSIG = 1


def _own_session_dying_with_sweep() -> None:
    """Run in each training child before exec: its own session (so that a timeout stops the run
    with everything it started) and, on Linux, SIGKILL when the sweep process dies. A run in its
    own session would otherwise outlive a killed sweep, finish behind its back, and the next
    invocation would find it finished instead of resuming it."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_status(out: Path) -> dict[str, dict[str, Any]]:
    """``<out>/sweep_status.json`` of an earlier invocation, or {} (none, or unreadable)."""
    path = out / "sweep_status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def select_runs(sweep: Sweep, patterns: list[str]) -> None:
    """Keep the runs whose name matches one of ``patterns`` (shell-style, e.g. 'peer,*' or
    '*,seed=2'); in place. A pattern that matches nothing is an error naming the runs."""
    if not patterns:
        return
    names = [run.name for run in sweep.runs]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ConfigError(f"--only {unmatched} matches no run of sweep {sweep.name!r}; its runs are: "
                          f"{', '.join(names)}")
    sweep.runs = [run for run in sweep.runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]


def _stop(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM to each run's process group at once (the trainer saves and exits), SIGKILL to
    the groups still alive ``grace`` seconds later."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, end - time.monotonic()))
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_local(sweep: Sweep, out: Path, configs: dict[str, Config], dry_run: bool = False, parallel: int = 1,
              run_timeout: float = 0.0, time_limit: float = 0.0) -> int:
    """Run the unfinished runs, up to ``parallel`` at once; 0 when every run finished.

    ``run_timeout`` (seconds, 0 = none) stops a run that takes longer; ``time_limit`` (seconds,
    0 = none) stops the sweep: runs still going are stopped and the rest are not started. Each
    outcome is printed and kept in ``<out>/sweep_status.json``."""
    logs = out / "logs"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    sweep_start = time.monotonic()
    deadline = sweep_start + time_limit if time_limit > 0 else None
    # Outcomes of earlier invocations stay (a sweep run in batches, e.g. with --only), and
    # this invocation's runs replace theirs.
    status: dict[str, dict[str, Any]] = _read_status(out)
    pending = []
    for index, run in enumerate(sweep.runs):
        run_dir = out / run.name
        state = run_status(run_dir, configs[run.name])
        command = train_command(sweep, run, run_dir)
        prefix = f"[sweep {sweep.name} {index + 1}/{len(sweep.runs)}] {run.name}:"
        if state == "finished":
            print(f"{prefix} finished, skipped", flush=True)
            status[run.name] = {"status": "skipped", "reason": "finished before this invocation"}
            continue
        if dry_run:
            print(f"{prefix} {'start' if state == 'new' else state.replace('@', ' from step ')} (dry run)\n"
                  f"    {shlex.join(command)}", flush=True)
            continue
        pending.append((run, prefix, state, command))
    if dry_run:
        return 0

    def record(run: SweepRun, **fields: Any) -> None:
        status[run.name] = {**fields, "log": str(logs / f"{run.name}.log")}
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep_status.json").write_text(json.dumps(status, indent=1) + "\n")

    running: list[_Running] = []
    try:
        while pending or running:
            now = time.monotonic()
            while pending and len(running) < parallel and (deadline is None or now < deadline):
                run, prefix, state, command = pending.pop(0)
                print(f"{prefix} {'start' if state == 'new' else state.replace('@', ' from step ')}\n"
                      f"    {shlex.join(command)}", flush=True)
                logs.mkdir(parents=True, exist_ok=True)
                log = open(logs / f"{run.name}.log", "a", encoding="utf-8")
                log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
                log.flush()
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=_own_session_dying_with_sweep)
                running.append(_Running(run, prefix, process, log, time.monotonic()))
            if deadline is not None and now >= deadline and pending:
                for run, prefix, _, _ in pending:
                    print(f"{prefix} NOT STARTED: the sweep's time limit ({time_limit:g} s) has passed", flush=True)
                    record(run, status="not_started", reason=f"time limit {time_limit:g} s")
                pending = []
            now = time.monotonic()
            over_sweep = deadline is not None and now > deadline
            late = [item for item in running if item.process.poll() is None
                    and (over_sweep or (run_timeout > 0 and now - item.started > run_timeout))]
            _stop([item.process for item in late])
            for item in list(running):
                seconds = time.monotonic() - item.started
                code = item.process.poll()
                if item in late:
                    limit = (f"run timeout {run_timeout:g} s" if run_timeout > 0 and now - item.started > run_timeout
                             else f"sweep time limit {time_limit:g} s")
                    print(f"{item.prefix} TIMEOUT: stopped after {seconds:.1f} s ({limit}); see "
                          f"{logs / (item.run.name + '.log')}", flush=True)
                    record(item.run, status="timeout", exit_code=code, seconds=round(seconds, 1), reason=limit)
                elif code is None:
                    continue
                elif code == 0:
                    print(f"{item.prefix} done in {seconds:.1f} s", flush=True)
                    record(item.run, status="done", exit_code=0, seconds=round(seconds, 1))
                else:
                    print(f"{item.prefix} FAILED with exit code {code} after {seconds:.1f} s; see "
                          f"{logs / (item.run.name + '.log')}", flush=True)
                    record(item.run, status="failed", exit_code=code, seconds=round(seconds, 1))
                item.log.close()
                running.remove(item)
            if running:
                time.sleep(0.2)
    except KeyboardInterrupt:  # the runs have their own sessions: pass the Ctrl-C on
        for item in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.process.pid, signal.SIGINT)
        for item in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                item.process.wait(timeout=60)
            record(item.run, status="interrupted", exit_code=item.process.returncode)
        print(f"[sweep {sweep.name}] interrupted; run the same command again to resume", flush=True)
        return 130
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_status.json").write_text(json.dumps(status, indent=1) + "\n")
    mine = {run.name for run in sweep.runs}  # an earlier batch's failures are its own
    bad = [name for name, entry in status.items() if name in mine and entry.get("status") not in ("done", "skipped")]
    if bad:
        print(f"[sweep {sweep.name}] {len(bad)} run(s) failed: {', '.join(bad)}; run the sweep again to "
              f"resume them (status: {out / 'sweep_status.json'})", flush=True)
        return 1
    return 0


def submit_slurm(sweep: Sweep, out: Path, configs: dict[str, Config], extra_args: list[str],
                 dry_run: bool = False) -> int:
    """Write the override lines and submit the unfinished runs as one array job."""
    out.mkdir(parents=True, exist_ok=True)
    lines_file = out / "slurm-overrides.txt"
    index_dir = out / ".slurm-index"
    index_dir.mkdir(exist_ok=True)
    lines = [f"# sweep {sweep.name}: line i is array task i, run directory .slurm-index/i"]
    pending = []
    for index, run in enumerate(sweep.runs):
        lines.append(" ".join(sweep.override_args(run)))
        run_dir = out / run.name
        run_dir.mkdir(exist_ok=True)  # an empty directory is a valid new run directory
        link = index_dir / str(index)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / run.name)
        status = run_status(run_dir, configs[run.name])
        print(f"[sweep {sweep.name}] task {index}: {run.name}: {status}")
        if status != "finished":
            pending.append(index)
    lines_file.write_text("\n".join(lines) + "\n")
    if not pending:
        print(f"[sweep {sweep.name}] every run has finished; nothing to submit")
        return 0
    (out / "logs").mkdir(exist_ok=True)
    command = ["sbatch", "--parsable", f"--job-name=moe-sweep-{sweep.name}",
               f"--array={','.join(map(str, pending))}", f"--output={out.resolve() / 'logs' / 'slurm-%A_%a.out'}",
               *sweep.slurm_args, *extra_args, str(SWEEP_SBATCH), "--config", str(sweep.base)]
    env = {**os.environ, "SWEEP_FILE": str(lines_file.resolve()), "RUN_DIR": str(index_dir.resolve()),
           "MOE_DIST_ROOT": str(REPO_ROOT)}
    shown = f"SWEEP_FILE={env['SWEEP_FILE']} RUN_DIR={env['RUN_DIR']} {shlex.join(command)}"
    if dry_run:
        print(f"[sweep {sweep.name}] would submit (dry run):\n    {shown}")
        return 0
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        print(f"[sweep {sweep.name}] sbatch failed ({result.returncode}): {result.stderr.strip()}\n    {shown}",
              file=sys.stderr)
        return 1
    job_id = result.stdout.strip().split(";")[0]
    print(f"[sweep {sweep.name}] submitted array job {job_id} ({len(pending)} task(s)): {shown}")
    print(job_id)
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="run a grid or list of training runs (locally or as a Slurm job array)",
        description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep file, e.g. configs/sweeps/experts.yaml")
    parser.add_argument("--out", default=None, help="directory of the run directories (default runs/sweeps/<name>)")
    parser.add_argument("--slurm", action="store_true", help="submit a Slurm job array instead of running locally")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch flag (repeatable), e.g. --sbatch-arg=--gpus-per-node=0")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print each run's status and command, and start nothing")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="local sweeps: up to N runs at once, each its own process (default 1)")
    parser.add_argument("--run-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="local sweeps: stop a run after this many seconds, recorded as a timeout (0 = none)")
    parser.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                        help="local sweeps: stop the whole sweep after this many seconds; runs not started by "
                             "then are recorded as not started (0 = none)")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="run only the runs whose name matches (shell-style, repeatable), e.g. "
                             "--only 'stratified,*' --only '*,seed=2'; the others are left as they are")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides applied to every run, e.g. train.steps=10")
    parser.set_defaults(handler=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    if args.parallel < 1 or args.run_timeout < 0 or args.time_limit < 0:
        raise ConfigError(f"--parallel ({args.parallel}) must be >= 1 and --run-timeout ({args.run_timeout}), "
                          f"--time-limit ({args.time_limit}) >= 0 (0 = no limit)")
    if args.slurm and (args.parallel != 1 or args.run_timeout or args.time_limit):
        raise ConfigError("--parallel, --run-timeout and --time-limit apply to local sweeps; Slurm runs the array "
                          "tasks itself (set its limits with --sbatch-arg, e.g. --sbatch-arg=--time=01:00:00)")
    sweep = load_sweep(args.config)
    select_runs(sweep, args.only)
    apply_overrides(sweep, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / sweep.name
    configs = check_runs(sweep, out, for_slurm=args.slurm)
    every = f"; every run: {' '.join(args.overrides)}" if args.overrides else ""
    print(f"[sweep {sweep.name}] {len(sweep.runs)} run(s) from {sweep.base} into {out}{every}", flush=True)
    if args.slurm:
        return submit_slurm(sweep, out, configs, args.sbatch_arg, dry_run=args.dry_run)
    return run_local(sweep, out, configs, dry_run=args.dry_run, parallel=args.parallel,
                     run_timeout=args.run_timeout, time_limit=args.time_limit)
