"""``moe-dist report``: a table, plots and power-law fits from finished (or partial) runs.

    moe-dist report runs/sweeps/experts [--out DIR] [--family moe.num_experts]

Each argument is a run directory (holding ``config.yaml`` and ``metrics.jsonl``) or a directory
of run directories (a sweep's output). Written to ``--out``; by default ``<argument>/report``
for one argument (a sweep directory or a single run, so two runs of one parent never share a
report), ``report-<name>+<name>...`` beside the first run for several:

* ``runs.csv`` (and ``runs.md``, the same as a Markdown table with the fits), one row per run:
  the config keys that differ between the runs (headed by their last two dotted parts, e.g.
  ``train.steps``, ``router.top_k``), total and active parameters, training FLOPs, final loss
  and validation loss, tokens/s, mean imbalance and drop rate (mean over MoE layers and logged
  steps);
* ``fits.csv`` and stdout: ``val_loss = a * C^b`` per family, fitted by least squares on
  ``log val_loss = log a + b log C`` over the validation points after warm-up, where C is the
  training FLOPs spent up to that step; a family without two such points at different C says
  why instead (no validation, all of it in warm-up, one point);
* ``loss_vs_flops.png``, ``loss_vs_params.png``, ``throughput.png`` and ``balance.png``.

Parameters are counted on a model built on the meta device (no memory, no init). *Active*
parameters count every non-expert parameter plus the experts a token uses: ``top_k`` of
``num_experts`` for top-k routers, ``expert_choice_capacity`` for expert choice, and the measured
mean realised k (``moe/layer_i/realized_k``) for the variable-k routers (top_p, xmoe, da_moe,
top_any). Training FLOPs are :func:`moe_dist.metrics.flops.training_flops_per_token`, with that
same number of experts per token, times the tokens of the steps run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moe_dist.config import Config, ConfigError, config_from_dict
from moe_dist.help_text import plain_text
from moe_dist.train.run_dir import flatten_config

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")
_LAYER_METRIC = re.compile(r"^moe/layer_(\d+)/(imbalance|drop_rate|realized_k)$")
FIXED_K_ROUTERS = ("softmax_topk", "sigmoid_topk")
TABLE_METRICS = ("total_params", "active_params", "active_k", "train_flops", "final_step", "final_loss",
                 "final_val_loss", "tokens_per_s", "mean_imbalance", "mean_drop_rate", "mean_realized_k")


@dataclass
class RunSummary:
    """The numbers of one run that the table and plots show."""

    name: str
    path: Path
    config: dict[str, Any]
    """Flattened resolved config (dotted key -> value) from config.yaml."""
    final_step: int
    final_loss: float | None
    """``loss`` of the last logged record that has one."""
    final_val_loss: float | None
    """``val_loss`` of the last validation."""
    tokens_per_s: float | None
    """Median of the logged ``tokens_per_s`` (robust to the first window's warm-up)."""
    mean_imbalance: float | None
    """Mean of ``moe/layer_i/imbalance`` over every MoE layer and logged step."""
    mean_drop_rate: float | None
    """Mean of ``moe/layer_i/drop_rate`` over every MoE layer and logged step."""
    mean_realized_k: float | None
    """Mean of ``moe/layer_i/realized_k`` over every MoE layer and logged step."""
    val_curve: list[tuple[int, float]]
    """(step, val_loss) of every validation."""
    flops_per_token: float | None
    tokens_per_step: int
    warmup_steps: int
    total_params: int | None = None
    active_params: int | None = None
    active_k: float | None = None
    """Experts per token used for active_params."""

    @property
    def train_flops(self) -> float | None:
        return None if self.flops_per_token is None else self.flops_per_token * self.tokens_per_step * self.final_step

    def flops_at(self, step: int) -> float:
        assert self.flops_per_token is not None
        return self.flops_per_token * self.tokens_per_step * step


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------

def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path itself, or its subdirectories that are runs."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "metrics.jsonl").is_file():
            found.append(path)
            continue
        children = sorted((c for c in path.iterdir() if (c / "metrics.jsonl").is_file()),
                          key=_natural_key) if path.is_dir() else []
        if not children:
            raise ConfigError(f"{path} is neither a run directory (no metrics.jsonl) nor a directory of runs")
        found.extend(children)
    return found


def _natural_key(path: Path) -> list:
    """``num_experts=4`` before ``num_experts=16``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_metrics(records: dict[int, dict[str, float | None]]) -> dict[str, Any]:
    """The table's metric columns from ``{step: record}`` (see :class:`RunSummary`)."""
    per_metric: dict[str, list[float]] = {"imbalance": [], "drop_rate": [], "realized_k": []}
    losses, throughput, val_curve = [], [], []
    for step, record in records.items():
        for key, value in record.items():
            match = _LAYER_METRIC.match(key)
            if match and value is not None and math.isfinite(value):
                per_metric[match.group(2)].append(value)
        if record.get("loss") is not None:
            losses.append(record["loss"])
        if record.get("tokens_per_s") is not None:
            throughput.append(record["tokens_per_s"])
        if record.get("val_loss") is not None:
            val_curve.append((step, record["val_loss"]))
    return {"final_step": max(records) if records else 0,
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": val_curve[-1][1] if val_curve else None,
            "tokens_per_s": statistics.median(throughput) if throughput else None,
            "mean_imbalance": _mean(per_metric["imbalance"]),
            "mean_drop_rate": _mean(per_metric["drop_rate"]),
            "mean_realized_k": _mean(per_metric["realized_k"]),
            "val_curve": val_curve}


def _tokenizer_vocab(cfg: Config) -> int:
    """The vocabulary of the run's ``data.tokenizer`` (a Hugging Face one is loaded); 0, after a
    warning, when it cannot be found any more."""
    from moe_dist.data import DataError
    from moe_dist.data.tokenizer import nominal_vocab_size

    try:
        return nominal_vocab_size(cfg.data, cfg.model.vocab_size)
    except DataError as exc:
        logger.warning("cannot count the vocabulary: %s", exc)
        return 0


def experts_per_token(cfg: Config, measured_k: float | None) -> float:
    """Experts one token uses, for the active-parameter count (see the module docstring)."""
    router = cfg.moe.router
    if router.type in FIXED_K_ROUTERS:
        return float(router.top_k)
    if router.type == "expert_choice":
        return min(router.expert_choice_capacity, float(cfg.moe.num_experts))
    return measured_k if measured_k is not None else float(router.top_k)


def count_model(cfg: Config, measured_k: float | None) -> tuple[int | None, int | None, float | None, float | None]:
    """(total params, active params, experts per token, training FLOPs per token) of ``cfg``.

    Expert FLOPs count :func:`experts_per_token` experts per token (the nominal top_k of the
    training loop's MFU would overstate a variable-k router that uses fewer).

    The model is built on the meta device. Counts are None for an architecture that cannot be
    built there; active params are None for architectures other than 'transformer'.
    """
    import torch

    from moe_dist.metrics.flops import training_flops_per_token
    from moe_dist.models.registry import build_model
    from moe_dist.moe.experts import GroupedExperts

    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = _tokenizer_vocab(cfg)
    try:
        with torch.device("meta"):
            model = build_model(model_cfg, cfg.moe)
    except Exception as exc:  # some architectures run real ops at init
        logger.warning("cannot build model.arch=%s on the meta device (%s); parameters and FLOPs left blank",
                       model_cfg.arch, exc)
        return None, None, None, None
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    if model_cfg.arch != "transformer":
        return total, None, None, training_flops_per_token(model_cfg, cfg.moe, cfg.data.seq_len, model=model).total
    k = experts_per_token(cfg, measured_k)
    moe_cfg = copy.deepcopy(cfg.moe)
    moe_cfg.router.top_k = k  # the FLOP count multiplies by it: count the experts really used
    flops = training_flops_per_token(model_cfg, moe_cfg, cfg.data.seq_len).total
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            expert_params = sum(p.numel() for p in module.parameters())
            inactive += expert_params * (1.0 - min(k, module.num_experts) / module.num_experts)
    return total, int(round(total - inactive)), k, flops


def load_run(path: Path, count: bool = True) -> RunSummary:
    """Read ``config.yaml`` and ``metrics.jsonl`` of one run directory."""
    from moe_dist.metrics.sink import read_metrics

    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"run {path} has no config.yaml; is it a moe-dist run directory?")
    raw = yaml.safe_load(config_file.read_text()) or {}
    cfg = config_from_dict(raw)
    records = read_metrics(path / "metrics.jsonl")
    if not records:
        raise ConfigError(f"run {path}: metrics.jsonl holds no records yet")
    stats = summarize_metrics(records)
    summary = RunSummary(name=path.name, path=path, config=flatten_config(cfg.to_dict()), flops_per_token=None,
                         tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
                         warmup_steps=cfg.train.warmup_steps, **stats)
    if count:
        total, active, k, flops = count_model(cfg, stats["mean_realized_k"])
        summary.total_params, summary.active_params, summary.active_k = total, active, k
        summary.flops_per_token = flops
    return summary


def swept_keys(runs: list[RunSummary]) -> list[str]:
    """Config keys whose values differ between the runs, in config order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


# --------------------------------------------------------------------------------------------
# Table and fits
# --------------------------------------------------------------------------------------------

def table_rows(runs: list[RunSummary]) -> list[dict[str, Any]]:
    keys = swept_keys(runs)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name}
        row.update({key: run.config.get(key) for key in keys})
        row.update({metric: getattr(run, metric) for metric in TABLE_METRICS})
        row["path"] = str(run.path)
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})


@dataclass(frozen=True)
class PowerLaw:
    """``loss = a * C^b`` fitted in log space."""

    a: float
    b: float
    r2: float
    points: int

    def __call__(self, compute: float) -> float:
        return self.a * compute ** self.b


def fit_power_law(compute: list[float], loss: list[float]) -> PowerLaw:
    """Least squares of ``log loss = log a + b log C``; needs two distinct positive C values."""
    import numpy as np

    x, y = np.log(np.asarray(compute, dtype=float)), np.log(np.asarray(loss, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"a power law needs at least two distinct compute values, got {sorted(set(compute))}")
    design = np.stack([np.ones_like(x), x], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (log_a + b * x)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / spread if spread > 0 else 1.0
    return PowerLaw(a=float(math.exp(log_a)), b=float(b), r2=r2, points=len(x))


def family_of(run: RunSummary, family_keys: list[str]) -> str:
    if not family_keys:
        return run.name
    missing = [key for key in family_keys if key not in run.config]
    if missing:
        raise ConfigError(f"--family key {missing[0]!r} is not a config key of run {run.name}")
    return ",".join(f"{key.split('.')[-1]}={run.config[key]}" for key in family_keys)


def fit_families(runs: list[RunSummary], family_keys: list[str]) -> dict[str, PowerLaw | str]:
    """A power law per family over its validation points after warm-up (or why there is none)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        family = family_of(run, family_keys)
        if run.flops_per_token is None:
            points.setdefault(family, [])
            continue
        points.setdefault(family, []).extend(
            (run.flops_at(step), loss) for step, loss in run.val_curve if step > run.warmup_steps)
    fits: dict[str, PowerLaw | str] = {}
    for family, values in points.items():
        if len({c for c, _ in values}) < 2:
            fits[family] = why_no_fit([run for run in runs if family_of(run, family_keys) == family])
            continue
        fits[family] = fit_power_law([c for c, _ in values], [v for _, v in values])
    return fits


def why_no_fit(runs: list[RunSummary]) -> str:
    """Why the runs of one family give fewer than two fit points (validations after warm-up at
    different compute), and what to change."""
    if all(run.flops_per_token is None for run in runs):
        return "training FLOPs are unknown (the model could not be built on the meta device)"
    steps = sorted({step for run in runs if run.flops_per_token is not None for step, _ in run.val_curve})
    warmup = max(run.warmup_steps for run in runs)
    after = [step for step in steps if step > warmup]
    if not steps:
        return ("no validation loss was logged (train.eval_every=0?); a power law needs validations at two or more "
                "steps after warm-up: set train.eval_every")
    if not after:
        return (f"every validation (step {', '.join(map(str, steps))}) falls within the warm-up "
                f"(train.warmup_steps={warmup}), which the fit leaves out; train longer or lower train.eval_every")
    return (f"only one validation after warm-up (step {after[0]}; train.warmup_steps={warmup}); a power law needs "
            "two or more at different compute: lower train.eval_every or train longer")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="CSV table, plots and power-law fits of training runs",
        description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep directories")
    parser.add_argument("--out", default=None, help="output directory (default: <sweep dir>/report)")
    parser.add_argument("--family", default="", metavar="KEY[,KEY]",
                        help="config keys that define a family for the power-law fits "
                             "(default: every run is its own family)")
    parser.add_argument("--title", default="", help="title prefix of the plots")
    parser.set_defaults(handler=_report)


def default_out(paths: list[str]) -> Path:
    """``<argument>/report`` for one argument (a sweep or a single run: two single-run reports
    never share a directory), ``report-<a>+<b>...`` beside the first for several."""
    if len(paths) == 1:
        return Path(paths[0]) / "report"
    names = "+".join(_UNSAFE.sub("_", Path(path).resolve().name) for path in paths)
    if len(names) > 80:
        names = f"{names[:71]}-{hashlib.sha1(names.encode()).hexdigest()[:8]}"
    return Path(paths[0]).parent / f"report-{names}"


def _report(args: argparse.Namespace) -> int:
    runs = [load_run(path) for path in find_run_dirs(args.runs)]
    out = Path(args.out) if args.out else default_out(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    write_csv(rows, out / "runs.csv")
    family_keys = [key for key in args.family.split(",") if key]
    fits = fit_families(runs, family_keys)
    fit_rows = [{"family": family, "a": fit.a, "b": fit.b, "r2": fit.r2, "points": fit.points}
                if isinstance(fit, PowerLaw) else {"family": family, "note": fit} for family, fit in fits.items()]
    write_csv(fit_rows, out / "fits.csv")
    (out / "runs.md").write_text(format_markdown(rows, fits), encoding="utf-8")
    print(format_table(rows))
    for family, fit in fits.items():
        if isinstance(fit, PowerLaw):
            print(f"fit {family}: val_loss = {fit.a:.4g} * C^{fit.b:.4f}  (R^2 {fit.r2:.3f}, {fit.points} points, "
                  "C = training FLOPs)")
        else:
            print(f"fit {family}: none ({fit})")
    images = write_plots(runs, fits, family_keys, out, title=args.title)
    print(f"wrote {out}/: runs.csv, runs.md, fits.csv, {', '.join(p.name for p in images)}")
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Table columns (no path) and their headers: the shortest unambiguous dotted suffix of at
    least two parts, so a key keeps its section (``train.steps``, ``log.every``, not ``every``)."""
    from moe_dist.sweep import short_keys

    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "path"]
    short = short_keys(columns, min_parts=2)
    return columns, [short[c] for c in columns]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A compact text table of the CSV rows (numbers to 4 significant digits)."""
    columns, headers = _columns(rows)
    body = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]], fits: dict[str, PowerLaw | str]) -> str:
    """The table and the fits as Markdown (what docs/scaling.md embeds)."""
    columns, headers = _columns(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    lines.append("")
    for family, fit in fits.items():
        text = (f"`val_loss = {fit.a:.4g} * C^{fit.b:.4f}` (R² {fit.r2:.3f}, {fit.points} points)"
                if isinstance(fit, PowerLaw) else f"no fit ({fit})")
        lines.append(f"- {family}: {text}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def write_plots(runs: list[RunSummary], fits: dict[str, PowerLaw | str], family_keys: list[str],
                out: Path, title: str = "") -> list[Path]:
    """The four PNGs of the module docstring (one colour per run throughout); their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = f"{title}: " if title else ""
    colour = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        if run.flops_per_token is None or not run.val_curve:
            continue
        ax.plot([run.flops_at(s) for s, _ in run.val_curve], [v for _, v in run.val_curve], "o-", ms=3, lw=1,
                color=colour[run.name], label=run.name)
        fit = fits.get(family_of(run, family_keys))
        if isinstance(fit, PowerLaw):
            xs = [run.flops_at(s) for s, _ in run.val_curve if s > run.warmup_steps]
            ax.plot(xs, [fit(x) for x in xs], "--", lw=0.8, color="black" if family_keys else colour[run.name])
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss",
           title=f"{prefix}validation loss vs compute (dashed: power-law fit)")
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "loss_vs_flops.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2 + 0.18 * len(runs)), sharey=True)
    for ax, attr, label in ((axes[0], "total_params", "total parameters"),
                            (axes[1], "active_params", "active parameters per token")):
        values = [getattr(run, attr) for run in runs]
        for run, x in zip(runs, values):
            if x is not None and run.final_val_loss is not None:
                ax.scatter([x], [run.final_val_loss], s=30, color=colour[run.name], label=run.name)
        known = [v for v in values if v]
        if known and max(known) > 4 * min(known):
            ax.set_xscale("log")
            plain_log_ticks(ax.xaxis)
        else:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set(xlabel=label)
    axes[0].set_ylabel("final validation loss")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=2, frameon=False)
    fig.suptitle(f"{prefix}final validation loss vs parameters")
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(runs) + 1) // 2), 1, 1))
    paths.append(_save(fig, out / "loss_vs_params.png", layout=False))

    paths.append(_bars(plt, runs, [("tokens_per_s", "tokens/s (median of logged windows)")],
                       f"{prefix}training throughput", out / "throughput.png"))
    paths.append(_bars(plt, runs, [("mean_imbalance", "mean max/mean expert load"),
                                   ("mean_drop_rate", "mean drop rate")],
                       f"{prefix}expert load (mean over MoE layers and logged steps)", out / "balance.png"))
    return paths


def format_log_tick(value: float) -> str:
    """A log-axis tick label: ``3.1``, ``0.05``, ``2000`` as plain numbers between 0.01 and
    10^4, ``10^12`` or ``3×10^12`` (mathtext) beyond: never ``3.1 × 10^0``."""
    if not value > 0 or not math.isfinite(value):
        return ""
    exponent = math.floor(math.log10(value) + 1e-9)
    if -2 <= exponent <= 3:
        return f"{value:.4g}"
    mantissa = value / 10 ** exponent
    if abs(mantissa - round(mantissa)) < 1e-6 * mantissa:
        mantissa = round(mantissa)
    if mantissa == 1:
        return f"$\\mathdefault{{10^{{{exponent}}}}}$"
    return f"$\\mathdefault{{{mantissa:.2g}\\times10^{{{exponent}}}}}$"


def plain_log_ticks(axis) -> None:
    """Label the ticks of a log-scaled matplotlib ``axis`` with :func:`format_log_tick`, on the
    ticks matplotlib itself would label (it labels minor ticks when the range spans little)."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return format_log_tick(x) if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _bars(plt, runs: list[RunSummary], metrics: list[tuple[str, str]], title: str, path: Path) -> Path:
    """Horizontal bars, one per run (first run on top), one panel per metric."""
    names = [run.name for run in runs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 + 4 * len(metrics), 1.2 + 0.35 * len(runs)),
                             sharey=True, squeeze=False)
    for ax, (attr, label) in zip(axes[0], metrics):
        values = [getattr(run, attr) for run in runs]
        ax.barh(names, [v or 0.0 for v in values], color=[f"C{i % 10}" for i in range(len(runs))])
        for y, v in enumerate(values):
            ax.annotate("n/a" if v is None else f"{v:.3g}", (v or 0.0, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set(xlabel=label)
        ax.margins(x=0.15)
        if not any(values):
            ax.set_xlim(0, 1)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: Path, layout: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
