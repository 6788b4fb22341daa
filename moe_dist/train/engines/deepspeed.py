"""The training loop on a DeepSpeed engine: moe_dist's :class:`~moe_dist.train.trainer.Trainer`
with the parallel plan, the step and the checkpoints swapped for DeepSpeed's.

What stays moe_dist's: data order (rank r's micro-batch m of step s is the same rows as under the
native engine), the model and its expert parallelism (:func:`apply_ep`), losses, validation,
metrics, run directory, signals. What DeepSpeed does: gradient reduction and partitioning (ZeRO
1/2), clipping, the AdamW step on fp32 master partitions, the scheduler, and the checkpoint
files.

Checkpoints (``<run_dir>/checkpoints/step_XXXXXXXX``) are written by ``engine.save_checkpoint``
into a temporary sibling directory, then moe_dist adds this rank's expert shard where needed
(``experts_ep{ep_rank}.pt``, see :func:`save_expert_shards`), hashes every file into
``manifest.json`` and renames the directory into place (``moe_dist.train.checkpoint``). Only then
does rank 0 point ``checkpoints/latest`` (DeepSpeed's pointer file) at it, so a kill at any
moment leaves the previous checkpoint and pointer intact. The step, data position, RNG state and
config travel in DeepSpeed's ``client_state``; routing state (router biases, controllers) is in
the module's buffers, which are replicated and saved with the module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from moe_dist.config import Config
from moe_dist.distributed.expert_parallel import apply_ep, is_expert_param
from moe_dist.distributed import comms
from moe_dist.distributed.zero import build_engine
from moe_dist.metrics import DeviceMeans
from moe_dist.models.cross_entropy import token_cross_entropy
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.runtime import Runtime
from moe_dist.train.trainer import Trainer, truncate_metrics

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
CLIENT_KEY = "moe_dist"


def expert_shard_name(ep_rank: int) -> str:
    return f"experts_ep{ep_rank:03d}.pt"


class ZeroPlan:
    """The part of the trainer's plan interface a DeepSpeed run uses: losses and reductions.

    Gradient reduction, clipping and the step belong to the engine, so ``no_sync``,
    ``finish_gradient_sync`` and ``clip_grad_norm_`` do not exist here. tp is 1 (validated).
    """

    def __init__(self, mesh) -> None:
        self.mesh = mesh

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of this rank's micro-batch."""
        return token_cross_entropy(logits, targets)

    def mean_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        return comms.all_reduce(tensor.clone(), "avg", self.mesh.dp_group)

    def sum_over_token_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every dp rank routes its own tokens (tp = 1)."""
        comms.all_reduce(tensor, "sum", self.mesh.dp_group)
        return tensor

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Routing-state updates that must stay identical on every rank (aux-free bias)."""
        from moe_dist.moe.balance import update_selection_bias_from_stats

        update_selection_bias_from_stats(model, reduce_fn=self.sum_over_token_ranks)


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
        mesh, cfg = self.rt.mesh, self.cfg
        apply_ep(self.model, mesh)
        self.plan = ZeroPlan(mesh)
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
        for micro in range(self.accum_steps):
            indices = self.sampler.micro_batch_indices(self.step, self.rt.mesh.dp_rank, self.rt.mesh.dp_size,
                                                       micro, self.cfg.train.micro_batch_size)
            inputs, targets = self._batch(indices, "train")
            total, lm_loss, router_losses = self._forward_loss(inputs, targets)
            engine.backward(total)  # divides by gradient_accumulation_steps, reduces at the boundary
            engine.step()  # optimizer + scheduler only at the accumulation boundary
            means.add({"train/loss": total, "train/lm_loss": lm_loss,
                       **{f"train/{name}": value for name, value in router_losses.items()}})
        norm = engine.get_global_grad_norm()
        if norm is not None:
            means.add({"train/grad_norm": torch.as_tensor(float(norm), device=self.device)})
        self.plan.after_optimizer_step(self.module)
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
