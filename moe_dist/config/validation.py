"""Cross-section checks that need the world size; every rank runs them before any collective."""

from __future__ import annotations

from moe_dist.config.errors import ConfigError, divisors, require, round_up
from moe_dist.config.root import Config
from moe_dist.config.run import ParallelConfig


def resolve_dp(parallel: ParallelConfig, world_size: int) -> int:
    if parallel.dp != -1:
        return parallel.dp
    return max(world_size // parallel.tp, 1)


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need the world size. Runs on every rank before any collective."""
    par = cfg.parallel
    dp = resolve_dp(par, world_size)
    require(dp * par.tp == world_size,
             f"parallel.dp ({dp}) x parallel.tp ({par.tp}) = {dp * par.tp} must equal the world size "
             f"({world_size}); use tp in {divisors(world_size)} and dp=-1 to infer dp")
    require(world_size % (par.ep * par.etp) == 0,
             f"parallel.ep ({par.ep}) x parallel.etp ({par.etp}) = {par.ep * par.etp} must divide the "
             f"world size ({world_size}); " + (f"use ep in {eps}" if (eps := [d for d in divisors(world_size)
                                                                            if world_size % (d * par.etp) == 0])
                                                else f"use etp in {divisors(world_size)}"))
    if cfg.moe.enabled:
        require(cfg.moe.num_experts % par.ep == 0,
                 f"moe.num_experts ({cfg.moe.num_experts}) must be divisible by parallel.ep ({par.ep}); "
                 f"use ep in {[d for d in divisors(cfg.moe.num_experts) if world_size % d == 0]} "
                 f"or num_experts={round_up(cfg.moe.num_experts, par.ep)}")
    elif par.ep > 1:
        raise ConfigError(f"parallel.ep ({par.ep}) > 1 needs an MoE model, but moe.num_experts "
                          f"({cfg.moe.num_experts}) / moe.every ({cfg.moe.every}) make it dense; set ep=1")
    require(not (cfg.moe.enabled and cfg.moe.router.type == "da_moe" and par.tp > 1),
             f"moe.router.type='da_moe' takes each token's K from its block's attention, which "
             f"parallel.tp ({par.tp}) > 1 splits over heads and the MoE layer over sequence slices; "
             "use tp=1 with da_moe (expert and data parallelism work)")
    if par.etp > 1:
        _validate_etp(cfg, world_size)
    if cfg.moe.dispatch_chunks > 1:
        _validate_dispatch_chunks(cfg)
    require(cfg.model.n_heads % par.tp == 0,
             f"model.n_heads ({cfg.model.n_heads}) must be divisible by parallel.tp ({par.tp}); "
             f"use tp in {[d for d in divisors(cfg.model.n_heads) if world_size % d == 0]}")
    if par.tp > 1 and par.sequence_parallel:
        require(cfg.data.seq_len % par.tp == 0,
                 f"data.seq_len ({cfg.data.seq_len}) must be divisible by parallel.tp ({par.tp}) with "
                 f"sequence parallelism; use seq_len={round_up(cfg.data.seq_len, par.tp)}")
    train = cfg.train
    per_step = train.micro_batch_size * dp
    require(train.global_batch_size % per_step == 0,
             f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
             f"train.micro_batch_size ({train.micro_batch_size}) x dp ({dp}) = {per_step}; "
             f"use global_batch_size={round_up(train.global_batch_size, per_step)}")
    if train.optimizer_state_dtype == "bf16":
        _validate_bf16_moments(cfg)
    if par.fsdp:
        _validate_fsdp(cfg)
    if train.engine == "deepspeed":
        _validate_deepspeed(cfg, world_size)
    if train.offload_optimizer:
        _validate_native_offload(cfg, world_size)
    if train.compile:
        require(train.engine == "native",
                "train.compile=true with train.engine=deepspeed: compiling blocks inside DeepSpeed's engine is not "
                "tested; set train.compile=false, or use train.engine=native")
        require(not cfg.parallel.fsdp,
                "train.compile=true with parallel.fsdp=true: the blocks would be compiled around FSDP2's "
                "all-gather hooks, which is not tested; set one of them to false")


def _validate_etp(cfg: Config, world_size: int) -> None:
    """What parallel.etp > 1 (expert tensor parallelism) needs (docs/parallelism.md)."""
    par = cfg.parallel
    require(cfg.moe.enabled,
            f"parallel.etp ({par.etp}) > 1 needs an MoE model, but moe.num_experts ({cfg.moe.num_experts}) / "
            f"moe.every ({cfg.moe.every}) make it dense; set etp=1")
    require(cfg.model.arch == "transformer",
            f"parallel.etp ({par.etp}) > 1 with model.arch={cfg.model.arch}: only the plain transformer's MoE "
            "layers split their experts over etp; use model.arch=transformer or parallel.etp=1")
    ffn = cfg.moe.expert_ffn_dim or cfg.model.ffn_dim
    what = (f"moe.expert_ffn_dim ({ffn})" if cfg.moe.expert_ffn_dim
            else f"model.ffn_dim ({ffn}, the experts' FFN as moe.expert_ffn_dim=0)")
    usable = [d for d in divisors(ffn) if d > 1 and world_size % (d * par.ep) == 0]
    require(ffn % par.etp == 0,
            f"{what} must be divisible by parallel.etp ({par.etp}): each etp rank holds ffn/etp "
            f"columns of every expert; use etp in {usable or [1]} or moe.expert_ffn_dim={round_up(ffn, par.etp)}")


def _validate_dispatch_chunks(cfg: Config) -> None:
    """What moe.dispatch_chunks > 1 (chunked all-to-all overlap, docs/parallelism.md) needs."""
    par, chunks = cfg.parallel, cfg.moe.dispatch_chunks
    require(cfg.moe.enabled and par.ep > 1,
            f"moe.dispatch_chunks ({chunks}) > 1 overlaps the expert-parallel all-to-all, but parallel.ep is "
            f"{par.ep}" + ("" if cfg.moe.enabled else " and the model is dense") + "; set moe.dispatch_chunks=1 "
            "or use parallel.ep > 1")
    require(par.etp == 1,
            f"moe.dispatch_chunks ({chunks}) > 1 with parallel.etp ({par.etp}) > 1 is not supported: the etp "
            "gather and reduce-scatter are not chunked; set moe.dispatch_chunks=1 or parallel.etp=1")
    require(cfg.model.arch == "transformer",
            f"moe.dispatch_chunks ({chunks}) > 1 with model.arch={cfg.model.arch}: only the plain transformer's "
            "MoE layer dispatches in chunks; use model.arch=transformer or moe.dispatch_chunks=1")


def _validate_fsdp(cfg: Config) -> None:
    """What parallel.fsdp supports (docs/parallelism.md, "FSDP2 with expert parallelism")."""
    par = cfg.parallel
    require(cfg.train.engine == "native",
            f"parallel.fsdp=true with train.engine={cfg.train.engine}: FSDP2 is the native engine's sharding; "
            "DeepSpeed shards with its own ZeRO. Use train.engine=native, or parallel.fsdp=false with "
            "zero.stage=1/2")
    require(par.tp == 1, f"parallel.fsdp=true with parallel.tp ({par.tp}) > 1 is not supported yet; "
                         "use tp=1 (shard with fsdp over dp) or parallel.fsdp=false")
    require(par.etp == 1,
            f"parallel.fsdp=true with parallel.etp ({par.etp}) > 1 is not supported: FSDP2 would shard the "
            "etp expert shards over edp, which the sharded grad-norm and checkpoint code do not handle; use "
            "parallel.fsdp=false with etp (experts split over etp, replicated over edp), or etp=1 with fsdp")
    require(cfg.model.arch == "transformer",
            f"parallel.fsdp=true with model.arch={cfg.model.arch}: only the plain transformer is sharded and "
            "tested with FSDP; use model.arch=transformer or parallel.fsdp=false")
    require(not cfg.moe.router.adaptive.enabled,
            "parallel.fsdp=true with moe.router.adaptive.enabled: DynMoE resets rows of the optimizer "
            "state, which FSDP shards; set moe.router.adaptive.enabled=false or parallel.fsdp=false")


def _validate_bf16_moments(cfg: Config) -> None:
    """train.optimizer_state_dtype=bf16 is the native engine's own AdamW over plain tensors."""
    for refused, reason, fix in (
            (cfg.train.engine == "deepspeed", "train.engine=deepspeed (ZeRO builds its optimizer state from the "
             "client AdamW's fp32 moments)", "train.engine=native"),
            (cfg.parallel.fsdp, "parallel.fsdp=true (its DTensor shards need torch's AdamW)", "parallel.fsdp=false"),
            (cfg.train.offload_optimizer, "train.offload_optimizer=true (the host AdamW keeps fp32 moments)",
             "train.offload_optimizer=false"),
            (cfg.train.optimizer_impl != "auto", f"train.optimizer_impl={cfg.train.optimizer_impl} (the bf16-moment "
             "AdamW has its own kernel)", "train.optimizer_impl=auto")):
        require(not refused, f"train.optimizer_state_dtype=bf16 with {reason}; use {fix}, or "
                              "train.optimizer_state_dtype=fp32")


def _validate_native_offload(cfg: Config, world_size: int) -> None:
    """What train.offload_optimizer supports (moe_dist/train/offload.py; docs/guide/large-models.md)."""
    require(cfg.train.engine == "native",
            "train.offload_optimizer=true with train.engine=deepspeed: this is the native engine's offload; "
            "DeepSpeed offloads with its own ZeRO-Offload. Use zero.offload_optimizer=true (zero.stage >= 1) "
            "with train.engine=deepspeed, or train.engine=native")
    require(world_size == 1,
            f"train.offload_optimizer=true with a world of {world_size} processes: the native optimizer offload "
            "runs in one process only (its gradient buffer bypasses the distributed gradient reduction); use "
            "one process, or train.engine=deepspeed with zero.stage=2 and zero.offload_optimizer=true for "
            "several ranks")
    require(cfg.train.optimizer_impl == "auto",
            f"train.optimizer_impl ({cfg.train.optimizer_impl!r}) with train.offload_optimizer=true: the "
            "offloaded AdamW runs on the host and picks its own kernel (fused on CPU where torch has it); "
            "leave train.optimizer_impl=auto")
    require(not cfg.moe.router.adaptive.enabled,
            "train.offload_optimizer=true with moe.router.adaptive.enabled: DynMoE writes new gate rows into "
            "the device copy of the weights between steps, which the host master weights would overwrite; "
            "set moe.router.adaptive.enabled=false or train.offload_optimizer=false")


def _validate_deepspeed(cfg: Config, world_size: int) -> None:
    """What train.engine=deepspeed supports (docs/deepspeed.md says why)."""
    par, stage = cfg.parallel, cfg.zero.stage
    require(world_size > 1, "train.engine=deepspeed needs at least 2 ranks (launch with torchrun, deepspeed "
                             "or mpirun); for one process use train.engine=native")
    require(par.tp == 1, f"train.engine=deepspeed with parallel.tp ({par.tp}) > 1 is not supported: "
                          "DeepSpeed's data-parallel group would span the tp ranks; use tp=1 or train.engine=native")
    require(par.etp == 1,
            f"train.engine=deepspeed with parallel.etp ({par.etp}) > 1 is not supported: expert tensor "
            "parallelism is the native engine's (DeepSpeed's expert groups, gradient norm and checkpoints know "
            "ep only); use train.engine=native with etp, or parallel.etp=1 with deepspeed")
    require(cfg.model.arch not in ("hmoe", "moa"),
            f"train.engine=deepspeed with model.arch={cfg.model.arch} is not supported: the architecture is "
            "tested with the native engine only (HMoE places whole experts of different widths per ep rank, "
            "which DeepSpeed's expert groups and checkpoints do not describe); use train.engine=native")
    require(cfg.train.optimizer_impl in ("auto", "for_loop"),
            f"train.optimizer_impl ({cfg.train.optimizer_impl!r}) with train.engine=deepspeed: the client "
            "AdamW over ZeRO's flat partitions is tested as the per-tensor loop only; use "
            "train.optimizer_impl=auto (or for_loop), or train.engine=native for the fused kernel")
    if cfg.moe.enabled and stage == 3:
        raise ConfigError(
            "zero.stage (3) with an MoE model: ZeRO-3 partitions every parameter over the whole data-"
            "parallel world and gathers it before each use, but moe_dist's expert weights differ from ep "
            "rank to ep rank (DeepSpeed 0.19 partitions experts over their expert-data-parallel group "
            "only for its own AutoEP layers; with ep=1 the MoE layer's backward fails under ZeRO-3's parameter "
            "partitioning); use zero.stage=2 (expert gradients and optimizer state are "
            "partitioned over the expert-data-parallel group, dense ones over all ranks), or zero.stage=3 "
            "with a dense model")
    if cfg.moe.enabled and par.ep > 1 and stage == 0:
        raise ConfigError(
            f"zero.stage (0) with parallel.ep ({par.ep}) > 1: DeepSpeed's non-ZeRO path measures the gradient "
            "norm as the mean of per-rank norms, which differs from the global norm once ranks hold different "
            "experts; use zero.stage=1 (the same update, optimizer state partitioned) or train.engine=native")


def grad_accum_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
