"""``moe-dist export RUN_DIR OUT_DIR``: a checkpoint as a Hugging Face ``transformers`` model.

    moe-dist export runs/tiny hf/tiny                    # newest verified checkpoint of the run
    moe-dist export runs/tiny/checkpoints/step_00000300 hf/tiny --dtype bfloat16

Reads a checkpoint of either engine at any parallel layout, in this one process
(``train/checkpoint_reader.py``), maps it (``models/hf_format.py``) and writes into OUT_DIR:
``model.safetensors`` (or shards of at most ``--max-shard-gib`` with
``model.safetensors.index.json``), ``config.json``, ``generation_config.json``, the run's tokenizer
(``tokenizer.json``, ``tokenizer_config.json``; none for ``data.tokenizer: none``) and
``moe_dist_export.json`` (where it came from).
Then ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads it: LlamaForCausalLM for a dense
model, MixtralForCausalLM for a plain MoE, Qwen2MoeForCausalLM with shared experts, dense blocks
between MoE blocks, or combine weights that are not renormalised. docs/interop.md has the
mapping, the refusals and the measured logit differences.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from moe_dist.config import Config, ConfigError
from moe_dist.help_text import plain_text
from moe_dist.models.hf_format import export_target, to_hf_state

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OUTPUTS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def export_checkpoint(source: Path, out_dir: Path, dtype: str | None = None, tokenizer_file: Path | None = None,
                      max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> Path:
    """Export the checkpoint ``source`` (a run or checkpoint directory) to ``out_dir``; returns
    the checkpoint directory that was read."""
    from moe_dist.train.checkpoint_reader import read_checkpoint

    out_dir = Path(out_dir)
    if out_dir.is_dir() and not overwrite and any((out_dir / name).exists() for name in _OUTPUTS):
        raise ConfigError(f"{out_dir} already holds an exported model; choose another OUT_DIR or pass --overwrite")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}")
    directory, cfg, state = read_checkpoint(Path(source))
    target = export_target(cfg.model, cfg.moe)  # refuses what has no counterpart, before writing anything
    if cfg.moe.enabled and cfg.moe.capacity.policy != "dropless":
        logger.warning("moe.capacity.policy=%s drops tokens above an expert's capacity; %s never drops, so its "
                       "outputs equal moe_dist's only where moe_dist dropped nothing", cfg.moe.capacity.policy,
                       target.architecture)
    tensors = to_hf_state(state, cfg.model, cfg.moe, target)
    if dtype is not None:
        tensors = {name: t.to(DTYPES[dtype]) if t.is_floating_point() else t for name, t in tensors.items()}
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype_name = str(next(iter(stored))).removeprefix("torch.") if len(stored) == 1 else "float32"
    bpe_file = _bpe_file(cfg, tokenizer_file)
    if cfg.data.tokenizer not in ("byte", "bpe", "none"):  # a Hugging Face tokenizer: found before writing
        from moe_dist.data.hf_tokenizer import locate_hf_tokenizer

        locate_hf_tokenizer(cfg.data.tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tensors, out_dir, max_shard_bytes)
    config = {**target.config, "dtype": dtype_name}
    _write_json(out_dir / "config.json", config)
    from moe_dist.interop.tokenizer_files import write_tokenizer

    eos = write_tokenizer(out_dir, cfg.data.tokenizer, cfg.model.max_seq_len, bpe_file)
    _write_json(out_dir / "generation_config.json", {"eos_token_id": eos, "pad_token_id": eos})
    _write_json(out_dir / "moe_dist_export.json", {
        "checkpoint": str(directory.resolve()), "architecture": target.architecture,
        "tokenizer": cfg.data.tokenizer, "dtype": dtype_name, "model": cfg.to_dict()["model"],
        "moe": cfg.to_dict()["moe"]})
    logger.info("exported %s as %s (%d tensors) to %s", directory, target.architecture, len(tensors), out_dir)
    return directory


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """One ``model.safetensors``, or numbered shards plus the index transformers reads."""
    try:
        from safetensors.torch import save_file
    except ModuleNotFoundError as exc:
        raise ConfigError("moe-dist export needs the 'safetensors' package: pip install -e '.[hf]'") from exc
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _bpe_file(cfg: Config, tokenizer_file: Path | None) -> Path | None:
    """The run's BPE ``tokenizer.json``: ``--tokenizer``, else the one the data cache holds for
    the run's data settings (found as the trainer finds it, never retrained here)."""
    if cfg.data.tokenizer != "bpe":
        return None
    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise ConfigError(f"--tokenizer {tokenizer_file}: no such file")
        return Path(tokenizer_file)
    from moe_dist.data.cache import cache_root
    from moe_dist.data.sources import resolve_source
    from moe_dist.data.tokenizer import build_tokenizer

    hint = "pass --tokenizer PATH/TO/bpe-*.json (the data cache's tokenizers/ folder holds the run's file)"
    spec = resolve_source(cfg.data)
    if spec.identity is None:
        raise ConfigError(f"the run's BPE tokenizer was trained on a hub dataset ({cfg.data.source}); {hint}")

    def documents() -> None:
        raise ConfigError(f"the run's BPE tokenizer is not in the data cache ({cache_root(cfg.data.cache_dir)}); "
                          f"{hint}")

    return build_tokenizer(cfg.data, spec.identity, documents, cache_root(cfg.data.cache_dir)).path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face transformers model (safetensors + config.json)",
        description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_DIR",
                        help="run directory (its newest checkpoint) or checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory for the Hugging Face files")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: as stored, float32 for the native engine)")
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="tokenizer.json of a BPE run (default: found in the run's data cache)")
    parser.add_argument("--max-shard-gib", type=float, default=5.0,
                        help="largest safetensors file; bigger models are sharded (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in OUT_DIR")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    if args.max_shard_gib <= 0:
        raise ConfigError(f"--max-shard-gib ({args.max_shard_gib}) must be positive")
    export_checkpoint(Path(args.source), Path(args.out_dir), args.dtype,
                      Path(args.tokenizer) if args.tokenizer else None,
                      max_shard_bytes=int(args.max_shard_gib * (1 << 30)), overwrite=args.overwrite)
    return 0
