"""``moe-dist``: the command-line entry point.

    moe-dist train [--config FILE] [--run-dir DIR] [--overwrite] [--print-config] [--dry-run]
                   [section.key=value ...]

The same command runs on one process or under any launcher (torchrun, deepspeed, mpirun,
srun): the rank layout is read from the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys

from moe_dist.config import DEFAULT_CONFIG, ConfigError, load_config

EPILOG = """\
examples:
  moe-dist train                                   # tiny MoE LM on the bundled corpus
  moe-dist train --config configs/tiny.yaml moe.num_experts=16 train.steps=200
  torchrun --nproc_per_node 4 -m moe_dist.cli train parallel.ep=4
  moe-dist train --print-config moe.router.top_k=1
"""


def _add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train an (MoE) language model",
        description="Train a decoder-only MoE LM. Overrides are dotted keys, e.g. moe.num_experts=16; "
                    "see docs/configuration.md for every key.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--config", default=None,
                        help=f"YAML config file (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)})")
    parser.add_argument("--run-dir", default=None,
                        help="directory for config.yaml, metrics.jsonl, tb/ and checkpoints/ "
                             "(default: runs/<config name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run directory that holds a different run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the process groups, print the rank layout and exit without training")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from moe_dist.train.entry import run_training

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    return run_training(cfg, config_path=args.config, run_dir=args.run_dir, overwrite=args.overwrite,
                        dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist", description="Distributed expert-parallel training of Mixture-of-Experts transformers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    for register in _extra_commands():
        register(subparsers)
    return parser


def _extra_commands():
    """Subcommands that live in their own modules (sweep, report) register here."""
    registrars = []
    for module_name in ("moe_dist.sweep", "moe_dist.report"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        registrars.append(module.register)
    return registrars


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before, between or after flags (`a=1 --dry-run b=2`): argparse leaves the
    # ones after a flag unparsed, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [item for item in extra if item.startswith("-") or "=" not in item]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"moe-dist: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
