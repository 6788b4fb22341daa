"""The architecture study of docs/architectures.md: train every model of the comparison on the
default corpus, then write a table (JSON + Markdown) and PNG plots.

    python docs/architectures_study.py --out /tmp/study [--steps 300] [train.device=cpu ...]
    python docs/architectures_study.py --peer-million --out /tmp/study   # 1024^2 PEER on one GPU

Each run is a separate process (``--one NAME``) so that its peak memory is its own: CUDA's
max_memory_allocated on a GPU, the process's max RSS on CPU. Extra ``key=value`` arguments are
config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated run names")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--peer-million", action="store_true")
    args, extra = parser.parse_known_args()
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
