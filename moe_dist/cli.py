"""``moe-dist``: the command-line entry point.

    moe-dist train [--config FILE] [--run-dir DIR] [--overwrite] [--print-config]
                   [--dry-run [--world-size N] [--device-memory-gib G]] [section.key=value ...]

The same command runs on one process or under any launcher (torchrun, deepspeed, mpirun,
srun): the rank layout is read from the environment.

Exit status of ``train``: 0 done; 2 config error (nothing trained); 3 ``--dry-run`` estimate
exceeds the device memory; 4 checkpoint or file-system error (checkpoints already written are
intact); 75 the collective watchdog ended a rank; 124 stopped by SIGUSR1/SIGTERM after a
checkpoint (run again to resume); 130 Ctrl-C. Errors the user can fix print one line
(:func:`user_error`); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from moe_dist.config import DEFAULT_CONFIG, ConfigError, load_config
from moe_dist.config.errors import describe_os_error

CONFIG_ERROR_EXIT_CODE = 2
"""The config, the command line or the launch environment is wrong (argparse uses 2 as well)."""
FILE_ERROR_EXIT_CODE = 4
"""A checkpoint failed verification or loading, or a file-system call failed (disk full, ...)."""
INTERRUPTED_EXIT_CODE = 130

EPILOG = """\
examples:
  moe-dist train                                   # tiny MoE LM on the bundled corpus
  moe-dist train --config configs/tiny.yaml moe.num_experts=16 train.steps=200
  torchrun --nproc_per_node 4 -m moe_dist.cli train parallel.ep=4
  moe-dist train --print-config moe.router.top_k=1
  moe-dist train --config configs/mixtral_8x7b.yaml --dry-run --world-size 64   # mesh + memory per rank
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
                        help="print the rank layout, the parameter counts and a per-rank memory estimate, "
                             "and exit without training (builds the process groups unless --world-size)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: plan for N ranks without starting any process")
    parser.add_argument("--device-memory-gib", type=float, default=None, metavar="G",
                        help="with --dry-run: memory of one device (default: the visible GPU's)")
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
    if args.world_size is not None or args.device_memory_gib is not None:
        if not args.dry_run:
            raise ConfigError("--world-size and --device-memory-gib plan a launch; use them with --dry-run")
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError(f"--world-size ({args.world_size}) must be >= 1")
    if args.dry_run and args.world_size is not None:
        from moe_dist.train.entry import plan_launch

        return plan_launch(cfg, args.world_size, args.device_memory_gib)
    return run_training(cfg, config_path=args.config, run_dir=args.run_dir, overwrite=args.overwrite,
                        dry_run=args.dry_run, device_memory_gib=args.device_memory_gib)


class _VersionAction(argparse.Action):
    """``--version``: the version (and git commit), computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from moe_dist.train.provenance import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist", description="Distributed expert-parallel training of Mixture-of-Experts transformers.")
    parser.add_argument("--version", action=_VersionAction, help="print the version (and git commit) and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    for register in _extra_commands():
        register(subparsers)
    return parser


def _extra_commands():
    """Subcommands that live in their own modules (sweep, report, export) register here."""
    registrars = []
    for module_name in ("moe_dist.sweep", "moe_dist.report", "moe_dist.interop.export"):
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
    threading.excepthook = _quiet_tensorboard_thread
    try:
        return args.handler(args)
    except (Exception, KeyboardInterrupt) as exc:
        reported = user_error(exc)
        if reported is None:
            raise  # a bug: keep the traceback
        code, message = reported
        print(f"moe-dist: {message}", file=sys.stderr)
        return code


def _quiet_tensorboard_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread dies on a full disk and its writer raises the same OSError in
    the training thread, which ``main`` prints as one line; the thread's traceback would repeat
    it as a crash. Every other thread's exception is printed as usual."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
        return
    threading.__excepthook__(args)


def user_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for a failure the user can fix, None for a bug.

    The message names the cause and the fix and is printed as is, without a traceback:

    * 2, ``config error: ...``: the config, an override, a path it names (data, run directory,
      resume checkpoint) or the launcher's environment is wrong. Nothing was trained.
    * 4, ``checkpoint error: ...`` or ``file-system error: ...``: a checkpoint does not verify or
      does not fit the model, or the OS refused a file operation (disk full, read-only,
      permissions). Checkpoints already written are intact; fix the cause and run again.
    * 130, ``interrupted``: Ctrl-C.
    """
    # Looked up in sys.modules: an error class whose module was never imported cannot be the cause.
    launch = sys.modules.get("moe_dist.distributed.launch_env")
    agreement = sys.modules.get("moe_dist.distributed.agreement")
    checkpoint = sys.modules.get("moe_dist.distributed.checkpoint")
    if isinstance(exc, ConfigError):
        return CONFIG_ERROR_EXIT_CODE, f"config error: {exc}"
    if (launch and isinstance(exc, launch.LaunchError)) or (agreement and isinstance(exc, agreement.AgreementError)):
        return CONFIG_ERROR_EXIT_CODE, f"launch error: {exc}"
    if checkpoint and isinstance(exc, checkpoint.CheckpointError):
        return FILE_ERROR_EXIT_CODE, f"checkpoint error: {exc}"
    if isinstance(exc, OSError):
        return FILE_ERROR_EXIT_CODE, f"file-system error: {describe_os_error(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED_EXIT_CODE, ("interrupted; checkpoints already written are intact, run the same "
                                       "command to resume from the newest")
    return None


if __name__ == "__main__":
    sys.exit(main())
