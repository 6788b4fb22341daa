"""The sections of a run: ``parallel``, ``data``, ``train``, ``checkpoint``, ``log``, ``zero``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moe_dist.config.errors import require


@dataclass(kw_only=True)
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree. -1 infers world_size / tp."""
    tp: int = 1
    """Tensor-parallel degree for attention, dense MLPs, embeddings and head. 1 disables it."""
    ep: int = 1
    """Expert-parallel degree: experts are sharded over groups of `ep` ranks. 1 disables it."""
    etp: int = 1
    """Expert tensor parallelism: every expert's FFN dim is split over `etp` ranks (the innermost
    dim of the MoE view edp x ep x etp; the rows of the etp group are all-gathered before the
    experts and the outputs reduce-scattered after). The expert FFN must be divisible by etp, and
    ep x etp must divide the world size. Native engine only, without fsdp, model.arch=transformer.
    1 disables it."""
    sequence_parallel: bool = True
    """With tp > 1, each TP rank routes its own slice of the sequence."""
    fsdp: bool = False
    """Shard parameters, gradients and AdamW state with FSDP2 (torch ``fully_shard``): dense
    weights over the dp ranks, expert weights over the edp ranks; bf16 compute with fp32
    gradient reduction on CUDA. Native engine, tp=1 and model.arch=transformer only. False keeps
    full replicas and moe_dist's own gradient all-reduce."""
    collective_timeout_s: float = 300.0
    """A collective that does not finish in this many seconds aborts every rank."""

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "etp"):
            value = getattr(self, name)
            require(value >= 1, f"parallel.{name} ({value}) must be >= 1 (1 disables it)")
        require(self.dp == -1 or self.dp >= 1, f"parallel.dp ({self.dp}) must be >= 1, or -1 to infer it")
        require(self.collective_timeout_s > 0,
                 f"parallel.collective_timeout_s ({self.collective_timeout_s}) must be positive")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "default"
    """'default' (the bundled Shakespeare corpus), a local path (.txt, .jsonl, .json, .parquet,
    a directory of them, or a dataset saved with save_to_disk), 'hf:<hub name>', or
    'megatron:PATH_PREFIX' (Megatron's pretokenized PATH_PREFIX.bin/.idx, read with
    megatron-core's IndexedDataset; its ids are not tokenized again)."""
    text_field: str = "text"
    """Column holding the text in JSONL/Parquet/hub datasets."""
    tokenizer: str = "byte"
    """'byte' maps UTF-8 bytes to ids 0..255; 'bpe' trains a byte-level BPE locally; any other
    value is a Hugging Face tokenizer: a local directory (AutoTokenizer), a tokenizer.json file
    (the tokenizers library) or a hub name such as 'gpt2' found in the Hugging Face cache.
    'none' only with data.source 'megatron:...': the ids are used as they are and the
    vocabulary is model.vocab_size."""
    bpe_vocab_size: int = 4096
    """Vocabulary of the locally trained BPE."""
    seq_len: int = 128
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Share of packed sequences held out for validation."""
    max_documents: int = 0
    """Use at most this many documents (0 = all), to keep CPU runs short."""
    seed: int = 1234
    """Seed of the shuffling order; the order is a pure function of (seed, epoch)."""
    cache_dir: str = ""
    """Where tokenised datasets are cached. '' means ~/.cache/moe_dist."""

    def __post_init__(self) -> None:
        require(self.seq_len > 0, f"data.seq_len ({self.seq_len}) must be positive")
        require(self.tokenizer.strip() != "", "data.tokenizer is empty; use 'byte', 'bpe', 'none' or "
                                              "a Hugging Face tokenizer (directory, tokenizer.json or hub name)")
        require(0 < self.val_fraction < 1, f"data.val_fraction ({self.val_fraction}) must be in (0, 1)")
        require(self.bpe_vocab_size >= 260,
                 f"data.bpe_vocab_size ({self.bpe_vocab_size}) must be >= 260 (bytes plus merges)")
        require(self.max_documents >= 0, f"data.max_documents ({self.max_documents}) must be >= 0")


_PROFILE_STEPS = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_profile_steps(spec: str) -> tuple[int, int]:
    """``train.profile_steps`` as (first, last) optimizer steps, both included, counted from 1;
    (0, 0) when it is '' (profiling off). '10-12' -> (10, 12), '7' -> (7, 7)."""
    if not spec.strip():
        return 0, 0
    match = _PROFILE_STEPS.fullmatch(spec)
    first = int(match.group(1)) if match else 0
    last = int(match.group(2) or first) if match else 0
    require(match is not None and 1 <= first <= last,
            f"train.profile_steps ({spec!r}) must be 'FIRST-LAST' with 1 <= FIRST <= LAST (e.g. '10-12') "
            "or one step (e.g. '10'), counted from 1; '' disables profiling")
    return first, last


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, the same for any number of ranks."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass; accumulation = global / (micro * dp)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay as a fraction of lr."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and router biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """torch AdamW implementation: 'fused' (one kernel per dtype and device: torchtitan's
    default), 'foreach' (multi-tensor ops), 'for_loop' (one tensor at a time). 'auto' is 'fused'
    when the native engine trains on CUDA without parallel.fsdp, else 'for_loop' (CPU, FSDP2).
    Each is elementwise, so sharded and unsharded runs of one implementation take the same step;
    different ones differ in the last bits. Refused with train.offload_optimizer (its host AdamW
    picks its own kernel) and with train.engine=deepspeed (the loop only)."""
    optimizer_state_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype of AdamW's two moments. 'bf16' (DeepSeek-V3's choice; Megatron-core's exp_avg_dtype /
    exp_avg_sq_dtype) keeps them in bf16 and updates in fp32 (moe_dist/train/adamw_bf16_moments.py,
    one Triton kernel per parameter on CUDA): 20 instead of 28 bytes of traffic and 4 instead of 8
    bytes of state per parameter. Native engine only, not with parallel.fsdp or
    train.offload_optimizer, and with train.optimizer_impl=auto."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value. 0 disables clipping. With torch's fused AdamW
    or train.optimizer_state_dtype=bf16 (native engine, not FSDP) the optimizer's kernel applies
    the clip as it reads the gradients (no scaling pass of its own)."""
    seed: int = 0
    """Seed of parameter init and any training randomness."""
    eval_every: int = 50
    """Compute validation loss every this many steps (and at the end). 0 disables it."""
    eval_batches: int = 4
    """Micro-batches per validation pass."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype of autocast: 'auto' is bf16 on GPU and fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train. 'auto' picks CUDA when available."""
    engine: Literal["native", "deepspeed"] = "native"
    """'native' is moe_dist's own loop; 'deepspeed' wraps the model in a DeepSpeed engine."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward instead of keeping them: 'selective' recomputes the
    attention (projections, RoPE, SDPA) and the expert MLPs, 'full' every block (it keeps only the
    block inputs). Routing statistics are counted once either way. 'none' keeps everything."""
    compile: bool = False
    """Compile each transformer block's forward with torch.compile (Inductor), block by block as
    torchtitan does, so blocks of the same shape share one compiled graph. Native engine without
    parallel.fsdp. The first steps pay the compilation (tens of seconds); on CUDA the Triton
    kernels are custom ops, so the MoE layer's fast path compiles without graph breaks."""
    offload_optimizer: bool = False
    """Native engine, one process: keep the fp32 master weights and AdamW moments in host memory
    (12 bytes per parameter) and step them with torch's fused CPU AdamW; the GPU holds the
    bf16 compute copy of the parameters (2 bytes) and an fp32 gradient buffer (4 bytes) that
    every micro-batch's gradient is added into. Norm and clipping run on the GPU; gradients go
    to the host and updated weights back in chunks, overlapped with the CPU math
    (docs/guide/large-models.md, "Optimizer offload"). For several ranks use train.engine=deepspeed with
    zero.offload_optimizer. False keeps everything on the device."""
    profile_steps: str = ""
    """Optimizer steps to trace with torch.profiler, 'FIRST-LAST' (e.g. '10-12') or one step
    ('10'), counted from 1. Rank 0 writes <run_dir>/profile/rank0_steps10-12.pt.trace.json
    (Perfetto, chrome://tracing); '' disables profiling."""
    profile_all_ranks: bool = False
    """With train.profile_steps, every rank writes its own trace (rank in the file name), not
    only rank 0."""

    def __post_init__(self) -> None:
        require(self.steps > 0, f"train.steps ({self.steps}) must be positive")
        require(self.global_batch_size > 0 and self.micro_batch_size > 0,
                 f"train.global_batch_size ({self.global_batch_size}) and train.micro_batch_size "
                 f"({self.micro_batch_size}) must be positive")
        require(self.lr > 0, f"train.lr ({self.lr}) must be positive")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        require(self.warmup_steps >= 0, f"train.warmup_steps ({self.warmup_steps}) must be >= 0")
        require(self.grad_clip >= 0, f"train.grad_clip ({self.grad_clip}) must be >= 0 (0 disables it)")
        require(self.eval_every >= 0, f"train.eval_every ({self.eval_every}) must be >= 0")
        require(self.eval_batches > 0, f"train.eval_batches ({self.eval_batches}) must be positive")
        first, last = parse_profile_steps(self.profile_steps)
        require(last <= self.steps, f"train.profile_steps ({self.profile_steps!r}) reaches past "
                 f"train.steps ({self.steps}); profile steps up to {self.steps}")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (and at the end). 0 saves only at the end."""
    keep_last: int = 2
    """Keep the newest K checkpoints; older ones are deleted after a verified save."""
    resume: str = "auto"
    """'auto' continues from the newest checkpoint in the run directory if one exists, 'none'
    starts fresh, any other value is a checkpoint directory to load."""

    def __post_init__(self) -> None:
        require(self.every >= 0, f"checkpoint.every ({self.every}) must be >= 0")
        require(self.keep_last >= 1, f"checkpoint.keep_last ({self.keep_last}) must be >= 1")


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10
    """Write metrics every this many steps (device-side accumulation in between)."""
    image_every: int = 100
    """Draw the expert-load images (the load heat map and each layer's load over time) at most
    once per this many steps; their scalars and histograms follow log.every. Drawing them takes
    the background writer tens of ms, which at log.every=1 slows the training loop."""
    tensorboard: bool = True
    """Write TensorBoard event files into <run_dir>/tb."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU. 0 looks it up for known GPUs; unknown means no MFU."""
    wandb: bool = False
    """Also log to Weights & Biases (install the [wandb] extra): the same scalars as TensorBoard,
    histograms, images and the config. Files go to <run_dir>/wandb/; with WANDB_MODE=offline
    nothing is uploaded until `wandb sync`. False disables it."""
    wandb_project: str = "moe_dist"
    """W&B project of the run."""
    wandb_run_name: str = ""
    """W&B display name of the run. '' uses the run directory's name."""
    wandb_entity: str = ""
    """W&B user or team that owns the run. '' uses the logged-in account's default."""

    def __post_init__(self) -> None:
        require(self.every > 0, f"log.every ({self.every}) must be positive")
        require(self.image_every > 0, f"log.image_every ({self.image_every}) must be positive, e.g. "
                "log.image_every=100")
        require(not self.wandb or bool(self.wandb_project.strip()),
                 "log.wandb_project is empty; name a W&B project, e.g. log.wandb_project=moe_dist")


@dataclass(kw_only=True)
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage (0, 1, 2 or 3) when train.engine=deepspeed."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU (ZeRO-Offload)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    bucket_size: int = 50_000_000
    """Reduce/allgather bucket size in elements."""
    ds_config: str = ""
    """Path of a DeepSpeed JSON config with extra keys (e.g. "wall_clock_breakdown") merged into
    the generated one. Keys moe_dist generates (batch sizes, clipping, precision,
    zero_optimization, optimizer, scheduler) are refused, not overridden. '' means none."""

    def __post_init__(self) -> None:
        require(self.stage in (0, 1, 2, 3), f"zero.stage ({self.stage}) must be 0, 1, 2 or 3")
        require(self.bucket_size > 0, f"zero.bucket_size ({self.bucket_size}) must be positive (elements)")
        require(not (self.offload_optimizer and self.stage == 0),
                 "zero.offload_optimizer needs zero.stage >= 1 (stage 0 keeps no partitioned optimizer "
                 "state to offload); set zero.stage=1 or 2")
