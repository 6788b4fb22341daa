"""The DeepSpeed engine (``train.engine=deepspeed``): moe_dist's
:class:`~moe_dist.train.trainer.Trainer` with the parallel plan, the step and the checkpoints
swapped for a DeepSpeed ZeRO engine's (the config it runs with: ``deepspeed_config.py``).

What stays moe_dist's: data order (rank r's micro-batch m of step s is the same rows as under the
native engine), the model and its parallelization (:func:`parallelize_model`, the native engine's
path too), losses, routing state, validation, metrics, run directory, signals. What DeepSpeed
does: gradient reduction and partitioning (ZeRO 1/2), clipping, the AdamW step on fp32 master
partitions, the scheduler, and the checkpoint files. docs/deepspeed.md lists every feature with
its parity test or the reason it is refused.

How expert parallelism meets DeepSpeed (DeepSpeed's MoE conventions, moe_dist's groups):

1. ``parallelize_model`` slices every MoE layer's experts (and PEER's tables) to this rank's
   block, installs the all-to-all dispatcher and the Stratified MoE pass agreement; moe_dist's
   mesh owns the ep and edp process groups. (tp = 1: validation refuses tp > 1 here.)
2. ``distributed/deepspeed_bridge.py`` registers *those same groups* in DeepSpeed's registry
   and tags expert parameters; :func:`~.deepspeed_config.optimizer_param_groups` moves them into
   ``moe=True`` optimizer groups.
3. :func:`build_engine`'s ``ExpertParallelEngine`` tells DeepSpeed that the model has MoE
   parameters (its own detection only recognises ``deepspeed.moe.layer.MoE`` modules), so the
   ZeRO optimizer reduces and partitions expert gradients and optimizer state over the
   expert-data-parallel group, divides expert gradients by the dp size (the same rule as
   moe_dist's GradReducer), and sums the expert part of the gradient norm once per expert.

Worked example, world 4, ``ep=2``: ep groups [0,1] [2,3], edp groups [0,2] [1,3]. Dense ZeRO
partitions span all 4 ranks; the partitions of expert 0's weights (held by ranks 0 and 2) span
[0,2]. ``ep=4``: edp groups of one rank each, so expert optimizer state is not partitioned.

Checkpoints (``<run_dir>/checkpoints/step_XXXXXXXX``) are written by ``engine.save_checkpoint``
into a temporary sibling directory, then moe_dist adds this rank's expert shard where needed
(``experts_ep{ep_rank}.pt``, see :func:`save_expert_shards`), hashes every file into
``manifest.json`` and renames the directory into place (``moe_dist.train.checkpoint``). Only then
does rank 0 point ``checkpoints/latest`` (DeepSpeed's pointer file) at it, so a kill at any
moment leaves the previous checkpoint and pointer intact. The step, data position, RNG state and
config travel in DeepSpeed's ``client_state``; routing state (router biases, controllers) is in
the module's buffers, which are replicated and saved with the module.

Routing state written between steps (:func:`sync_changed_slots`): DynMoE growth writes a new gate
row and threshold into the module's parameters after the step. Under ZeRO those parameters are a
copy of the fp32 master partitions, which the next step would copy back over them; the new rows
are therefore written into the master partitions too, and the Adam moments of every changed slot
are zeroed there, as the native engine does in its optimizer state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from moe_dist.config import Config
from moe_dist.distributed.deepspeed_bridge import init_deepspeed_comm, register_expert_groups, tag_expert_params
from moe_dist.distributed.grad_sync import grad_norm
from moe_dist.distributed.mesh import ParallelMesh
from moe_dist.distributed.param_tags import is_expert_param
from moe_dist.metrics import DeviceMeans
from moe_dist.models.parallelize import parallelize_model
from moe_dist.moe.routing import adaptive
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.engines.deepspeed_config import build_ds_config, optimizer_param_groups
from moe_dist.train.optim import build_scheduler
from moe_dist.train.plan import DeepSpeedPlan
from moe_dist.train.runtime import Runtime
from moe_dist.train.trainer import Trainer, truncate_metrics

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
CLIENT_KEY = "moe_dist"


def expert_shard_name(ep_rank: int) -> str:
    return f"experts_ep{ep_rank:03d}.pt"


class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` whose backward, step and checkpoints go through a DeepSpeed engine.

    ``self.model`` is the engine (an ``nn.Module`` whose forward is the model's), so the inherited
    forward, validation and metrics code runs unchanged; ``self.module`` is the bare model.
    """

    def __init__(self, cfg: Config, run_dir: Path, runtime: Runtime) -> None:
        super().__init__(cfg, run_dir, runtime)
        self.module = self.model
        self.model = self.engine
        self.autocast_dtype = None  # DeepSpeed casts the module itself when bf16 is on

    def _configure_parallelism(self) -> None:
        mesh, cfg, watchdog = self.rt.mesh, self.cfg, self.rt.watchdog
        parallelize_model(self.model, mesh, cfg.parallel, watchdog.record if watchdog else None)
        self.plan = DeepSpeedPlan(mesh)
        bf16 = self.rt.autocast_dtype(cfg.train.dtype) is torch.bfloat16
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.engine = build_engine(self.model, cfg, mesh, bf16=bf16, backend=backend,
                                   local_rank=self.rt.env.local_rank)
        self.optimizer = self.engine.optimizer
        self.scheduler = self.engine.lr_scheduler

    # ------------------------------------------------------------------ steps
    def train_step(self, means: DeviceMeans) -> None:
        engine = self.engine
        self.model.train()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        norm = None
        for micro in range(self.accum_steps):
            indices = self.sampler.micro_batch_indices(self.step, self.rt.mesh.dp_rank, self.rt.mesh.dp_size,
                                                       micro, self.cfg.train.micro_batch_size)
            inputs, targets = self._batch(indices, "train")
            total, lm_loss, router_losses = self._forward_loss(inputs, targets)
            engine.backward(total)  # divides by gradient_accumulation_steps, reduces at the boundary
            if micro == self.accum_steps - 1 and not (engine.zero_optimization() or engine.bfloat16_enabled()):
                # ZeRO-0 in fp32 clips the reduced grads but keeps no norm (ep = 1 there, validated)
                norm = grad_norm(self.module.parameters(), self.rt.mesh)
            engine.step()  # optimizer + scheduler only at the accumulation boundary
            means.add({"train/loss": total, "train/lm_loss": lm_loss,
                       **{f"train/{name}": value for name, value in router_losses.items()}})
        norm = engine.get_global_grad_norm() if norm is None else norm
        if norm is not None:
            means.add({"train/grad_norm": torch.as_tensor(float(norm), device=self.device)})
        self.plan.after_optimizer_step(self.module)
        sync_changed_slots(self.module, self.optimizer)  # DynMoE slots changed this step
        self.step += 1

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict:
        return {CLIENT_KEY: {"step": self.step, "rng": ckpt.rng_state(),
                             "data": {"next_step": self.step, "seed": self.cfg.data.seed},
                             "config": self.cfg.to_dict()}}

    def save(self) -> Path:
        def write(directory: Path) -> None:
            self.engine.save_checkpoint(str(directory.parent), tag=directory.name,
                                        client_state=self.client_state(), save_latest=False)
            save_expert_shards(self.module, self.rt.mesh, directory)
            if self.rt.is_logging_rank:
                (directory / "config.yaml").write_text(self.cfg.to_yaml())

        with self.throughput.paused():
            self.metrics.flush()  # metrics.jsonl holds every step up to this checkpoint
            final = ckpt.save_checkpoint(self.run_dir, self.step, write, self.cfg.checkpoint.keep_last,
                                         is_writer=self.rt.is_logging_rank, barrier=self.rt.barrier)
            if self.rt.is_logging_rank:
                write_latest_pointer(final)
            self.rt.barrier()
        return final

    def maybe_resume(self) -> None:
        directory = ckpt.resolve_resume(self.run_dir, self.cfg.checkpoint.resume)
        if directory is None:
            return
        path, client = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None or client is None or CLIENT_KEY not in client:
            raise ckpt.CheckpointError(f"checkpoint {directory} is not a moe_dist DeepSpeed checkpoint "
                                       f"(no '{CLIENT_KEY}' client state); was it written by train.engine=native?")
        load_expert_shards(self.module, self.rt.mesh, directory)
        state = client[CLIENT_KEY]
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.rt.is_logging_rank:
            truncate_metrics(self.run_dir / "metrics.jsonl", after_step=self.step)
        logger.info("resumed from %s at step %d", directory, self.step)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------

def _engine_class():
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        """A DeepSpeedEngine that counts tagged expert parameters as MoE layers.

        DeepSpeed sets ``has_moe_layers`` only for its own ``MoE`` modules; with moe_dist's layers
        it would stay False and the ZeRO optimizer would partition expert state over the whole
        world, mixing different ranks' experts. Everything else is DeepSpeed's own code path.
        """

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if any(is_moe_param(p) for p in self.module.parameters()):
                self.has_moe_layers = True

    return ExpertParallelEngine


def build_engine(model: nn.Module, cfg: Config, mesh: ParallelMesh, *, bf16: bool, backend: str,
                 local_rank: int):
    """Wrap ``model`` (already parallelized: ``parallelize_model`` ran) in a DeepSpeed engine.

    Steps: attach DeepSpeed's comm layer to our process group, register our expert groups,
    tag expert params, build the torch AdamW with dense/expert groups, then the engine (which
    wraps AdamW in the ZeRO optimizer and drives the scheduler). Returns the engine.
    """
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime.config import DeepSpeedConfig

    init_deepspeed_comm(backend, local_rank)
    group_name = register_expert_groups(mesh)
    if group_name is not None:
        tag_expert_params(model, group_name)
    train = cfg.train
    ds_config = build_ds_config(cfg, mesh.dp_size, bf16)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, train.weight_decay, group_name), lr=train.lr,
                                  betas=(train.beta1, train.beta2), eps=1e-8, foreach=False)
    config_class = DeepSpeedConfig(ds_config, None)
    set_optimizer_flags(config_class, model)
    engine = _engine_class()(args=None, model=model, optimizer=optimizer,
                             lr_scheduler=lambda opt: build_scheduler(opt, train),
                             dist_init_required=False, config=ds_config, config_class=config_class)
    if group_name is not None and not engine.has_moe_layers:
        raise RuntimeError("DeepSpeed did not register the expert parameters as MoE parameters; "
                           "check the deepspeed version (moe_dist was written against 0.19.8)")
    return engine


# --------------------------------------------------------------------------------------------
# Routing state written between steps (DynMoE)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def sync_changed_slots(module: nn.Module, optimizer) -> list[tuple[int, int]]:
    """After :func:`~moe_dist.moe.routing.adaptive.update_adaptive_experts` (every rank): make the
    slots it switched on or off hold under the ZeRO optimizer. Returns (layer position, slot)
    pairs, like the native engine's ``reset_pending_optimizer_state``.

    For each changed slot of each adaptive layer:

    1. its gate row and threshold, already written into the module's parameters, are copied
       into this rank's fp32 master partition (the next step starts from the master);
    2. the Adam moments of its gate row, threshold and, on the owning ep rank, expert weights
       are zeroed in this rank's partition of the optimizer state.

    Without a master copy (ZeRO-0 in fp32: the optimizer steps the module's own parameters) the
    native rule applies unchanged.
    """
    if not any(hasattr(p, "_hp_mapping") for p in module.parameters()):
        return adaptive.reset_pending_optimizer_state(module, optimizer)
    done = []
    for position, layer in enumerate(adaptive.adaptive_layers(module)):
        router, experts = layer.router, layer.experts
        slots = router.pending_resets
        for param in (router.weight, router.threshold):
            _reset_rows(optimizer, param, slots, copy_to_master=True)
        local = [s - experts.expert_offset for s in slots if 0 <= s - experts.expert_offset < experts.num_experts]
        for param in experts.parameters():
            _reset_rows(optimizer, param, local, copy_to_master=False)
        done += [(position, slot) for slot in slots]
        router.pending_resets = []
    return done


def partition_fragments(optimizer, param: torch.Tensor) -> tuple[slice, torch.Tensor, dict[str, torch.Tensor]] | None:
    """This rank's piece of ``param`` in a ZeRO-1/2 (or bf16) optimizer: (the flattened param's
    elements it covers, their fp32 master values, {state key: their optimizer state}); None when
    no element of ``param`` is in this rank's partition.

    DeepSpeed links each parameter to its partition (``param._hp_mapping``). The state is read
    from the flat fp32 partition that the wrapped torch optimizer steps (its only param in group
    ``param_group_index``), not from the mapping's own state views: DeepSpeed 0.19.8 links those
    once, right after the first param group's first step, so every later group's are empty.
    """
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    base = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside the ZeRO optimizer
    flat = base.param_groups[mapping.param_group_index]["params"][0]
    address, here = mapping.hp_fragment_address, mapping.lp_fragment_address
    master = mapping.get_hp_fragment()
    assert master.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), "ZeRO partition layout changed"
    state = {key: value.narrow(0, address.start, address.numel) for key, value in base.state.get(flat, {}).items()
             if torch.is_tensor(value) and value.shape == flat.shape}
    return slice(here.start, here.start + here.numel), master, state


def _reset_rows(optimizer, param: torch.Tensor, rows: list[int], copy_to_master: bool) -> None:
    """Zero the optimizer state of ``rows`` (indices along dim 0) of ``param`` in this rank's
    partition; with ``copy_to_master`` also copy the rows' current values into the master."""
    found = partition_fragments(optimizer, param) if rows else None
    if found is None:
        return
    here, master, state = found
    flat = param.detach().reshape(-1)
    row_numel = param.numel() // param.shape[0]
    for row in rows:
        lo, hi = max(row * row_numel, here.start), min((row + 1) * row_numel, here.stop)
        if lo >= hi:
            continue
        in_fragment = slice(lo - here.start, hi - here.start)
        if copy_to_master:
            master[in_fragment] = flat[lo:hi].to(master.device, master.dtype)
        for value in state.values():  # every per-element state (AdamW: exp_avg, exp_avg_sq)
            value[in_fragment] = 0


# --------------------------------------------------------------------------------------------
# Expert shards and the latest pointer
# --------------------------------------------------------------------------------------------

def _expert_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters() if is_expert_param(p)}


def save_expert_shards(module: torch.nn.Module, mesh, directory: Path) -> None:
    """Write this ep rank's expert weights (``experts_ep{ep_rank}.pt``) from edp rank 0.

    DeepSpeed writes the module's state dict from rank 0 alone, which holds only rank 0's experts
    (it splits expert files out only for its own MoE modules); ZeRO's per-rank optimizer shards do
    hold every rank's fp32 master weights. The shard file makes the module weights right too, so
    the first forward after a resume uses the saved experts, not rank 0's.
    """
    if mesh.ep_size == 1 or mesh.edp_rank != 0:
        return
    state = {name: tensor.cpu().clone() for name, tensor in _expert_state(module).items()}
    ckpt.torch_save({"ep_rank": mesh.ep_rank, "ep_size": mesh.ep_size, "experts": state},
                    directory / expert_shard_name(mesh.ep_rank))


@torch.no_grad()
def load_expert_shards(module: torch.nn.Module, mesh, directory: Path) -> None:
    if mesh.ep_size == 1:
        return
    saved = ckpt.load_file(directory, expert_shard_name(mesh.ep_rank))
    if saved["ep_size"] != mesh.ep_size:
        raise ckpt.CheckpointError(f"checkpoint {directory} was written with parallel.ep={saved['ep_size']}; "
                                   f"this run has ep={mesh.ep_size}; resume with the same ep")
    current = _expert_state(module)
    ckpt.check_state_dict_fits(saved["experts"], current, str(directory / expert_shard_name(mesh.ep_rank)))
    for name, tensor in current.items():
        tensor.copy_(saved["experts"][name])  # in place: ZeRO's flat buffers alias the params


def write_latest_pointer(final: Path) -> None:
    """``checkpoints/latest`` names the newest complete checkpoint (DeepSpeed's convention, read by
    its tools such as zero_to_fp32.py); replaced atomically after the directory is in place."""
    pointer = final.parent / LATEST_FILE
    tmp = final.parent / f".{LATEST_FILE}.tmp"
    tmp.write_text(final.name)
    os.replace(tmp, pointer)
