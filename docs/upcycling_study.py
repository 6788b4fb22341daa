"""The upcycling study of docs/architectures.md (issue 18 section 2): an MoE upcycled from a dense
checkpoint against the same MoE trained from scratch, at equal tokens.

    python docs/upcycling_study.py --out /tmp/upcycling [--dense-steps 200] [--moe-steps 200] [--seed 0]

On the default corpus with the ``configs/tiny.yaml`` shape (d=128, 4 blocks, MoE in blocks 1 and 3,
8 experts, top-2), on whatever device the config picks (``train.device=cpu`` to force CPU):

1. ``dense``: ``moe.every=0`` for N steps (its final checkpoint is the upcycling source);
2. ``<mode>_upcycled``: the MoE initialised from it with ``model.init_from`` and
   ``model.upcycle_mode=<mode>``, trained M more steps (fresh optimizer, warm-up and cosine over M);
3. ``<mode>_scratch_M``: the same MoE from a random init for M steps (the same tokens as 2);
4. ``<mode>_scratch_N+M``: the same MoE for N+M steps (the tokens of 2 plus the dense pre-training);
5. ``dense_N+M``: the dense model for N+M steps from scratch (does the MoE beat dense at all here?).

Copy mode needs experts as wide as the dense MLP (``moe.expert_ffn_dim=384``, so each token's MoE
layer costs two dense MLPs); partition mode cuts the 384 neurons into 8 experts of 48 (each token's
MoE layer costs a quarter of a dense MLP). Each mode's scratch runs use its own expert width.
Each run is one ``moe-dist train`` process; the exact commands are printed and saved in
``OUT/results.json`` with the validation curves (every 50 steps, 16 validation batches).
Extra ``key=value`` arguments are appended to every command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = ["train.eval_every=50", "train.eval_batches=16", "checkpoint.every=0", "log.tensorboard=false",
          "log.progress_bar=false"]
MODES = {"copy": ["moe.expert_ffn_dim=384"],
         "partition": ["moe.expert_ffn_dim=48", "model.upcycle_mode=partition"]}


def plan(out: Path, n: int, m: int, seed: int, modes: list[str]) -> list[tuple[str, list[str], int, int]]:
    """(name, overrides, steps of this run, total tokens-in-steps including a dense source)."""
    runs = [("dense", ["moe.every=0", f"train.steps={n}"], n, n),
            ("dense_N+M", ["moe.every=0", f"train.steps={n + m}"], n + m, n + m)]
    for mode in modes:
        shape = MODES[mode]
        runs += [(f"{mode}_upcycled", [*shape, f"model.init_from={out / 'dense'}", f"train.steps={m}"], m, n + m),
                 (f"{mode}_scratch_M", [*shape, f"train.steps={m}"], m, m),
                 (f"{mode}_scratch_N+M", [*shape, f"train.steps={n + m}"], n + m, n + m)]
    return [(name, [*ov, f"train.seed={seed}"], steps, total) for name, ov, steps, total in runs]


def curve(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dense-steps", type=int, default=200)
    parser.add_argument("--moe-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="copy,partition")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = args.out.resolve()
    n, m = args.dense_steps, args.moe_steps
    tokens_per_step = 16 * 128  # tiny.yaml: 16 sequences of 128 tokens
    results = []
    for name, overrides, steps, total in plan(out, n, m, args.seed, args.modes.split(",")):
        cmd = [sys.executable, "-m", "moe_dist.cli", "train", "--config", "configs/tiny.yaml",
               "--run-dir", str(out / name), "--overwrite", *overrides, *COMMON, *args.overrides]
        shown = "moe-dist train " + " ".join(shlex.quote(c) for c in cmd[4:])
        print(shown, flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        vals = curve(out / name)
        results.append({"name": name, "command": shown, "steps": steps, "tokens": steps * tokens_per_step,
                        "total_tokens": total * tokens_per_step, "val_loss": vals[max(vals)], "curve": vals,
                        "wall_s": wall})
        print(f"  val_loss {vals[max(vals)]:.4f} ({wall:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    by = {r["name"]: r for r in results}
    lines = ["| run | steps | tokens of this run (k) | tokens incl. dense pre-training (k) | val loss | "
             "upcycled minus this |", "|---|---|---|---|---|---|"]
    for r in results:
        mode = r["name"].split("_")[0]
        up = by.get(f"{mode}_upcycled")
        delta = f"{up['val_loss'] - r['val_loss']:+.4f}" if up and r is not up else ""
        lines.append(f"| {r['name']} | {r['steps']} | {r['tokens'] / 1e3:.0f} | {r['total_tokens'] / 1e3:.0f} | "
                     f"{r['val_loss']:.4f} | {delta} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
