"""The native engine (``train.engine=native``, the default): moe_dist runs backward, its own
gradient reduction (``distributed/grad_sync.py``) or none, the torch AdamW step and DCP
checkpoints readable at any layout (``distributed/checkpoint.py``). With
``train.offload_optimizer`` (one process) the AdamW state lives on the host
(``train/offload.py``)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from moe_dist.metrics import DeviceMeans
from moe_dist.moe.routing import adaptive
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.offload import OffloadedAdamW, OffloadPlan
from moe_dist.train.optim import (build_optimizer, build_scheduler, clips_inside_step, fused_by_default,
                                  set_clip_scale)
from moe_dist.train.trainer import Trainer

logger = logging.getLogger(__name__)


class NativeTrainer(Trainer):
    """:class:`Trainer` on moe_dist's own plan (``moe_dist.train.plan``)."""

    def _place_model(self) -> None:
        if not self.cfg.train.offload_optimizer:  # offload: OffloadedAdamW places the device copy
            super()._place_model()

    def _configure_parallelism(self) -> None:
        """moe_dist's own plan (TP/EP + gradient hooks, or the identity alone), AdamW, cosine;
        with ``train.offload_optimizer`` (one process) the host-offloaded AdamW and its plan."""
        if self.cfg.train.offload_optimizer:
            compute_dtype = self.rt.autocast_dtype(self.cfg.train.dtype) or torch.float32
            self.optimizer = OffloadedAdamW(self.model, self.cfg.train, self.device, compute_dtype)
            self.plan = OffloadPlan(self.model, self.optimizer)
        else:
            self.plan = self.rt.parallelize(self.model, self.cfg)
            self.optimizer = build_optimizer(self.model, self.cfg.train,
                                             prefer_fused=fused_by_default(self.device, self.cfg.parallel.fsdp))
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train)
        # Not over FSDP2's DTensor gradients: the scale would meet them inside torch's fused kernel.
        self._clips_inside_step = clips_inside_step(self.optimizer) and not self.cfg.parallel.fsdp

    # ------------------------------------------------------------------ checkpoints
    def state_payload(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(), "data": {"next_step": self.step, "seed": self.cfg.data.seed},
                "config": self.cfg.to_dict()}

    def save(self) -> Path:
        def write(directory: Path) -> None:
            self.plan.save_model_and_optimizer(directory, self.model, self.optimizer)
            if self.rt.is_logging_rank:
                ckpt.torch_save(self.state_payload(), directory / "trainer.pt")
                (directory / "config.yaml").write_text(self.cfg.to_yaml())

        with self.throughput.paused():
            self.metrics.flush()  # metrics.jsonl holds every step up to this checkpoint
            return ckpt.save_checkpoint(self.run_dir, self.step, write, self.cfg.checkpoint.keep_last,
                                        is_writer=self.rt.is_logging_rank, barrier=self.rt.barrier)

    def maybe_resume(self) -> None:
        directory = ckpt.resolve_resume(self.run_dir, self.cfg.checkpoint.resume,
                                        warn=logger.warning if self.rt.is_logging_rank else None)
        if directory is None:
            return
        self.plan.load_model_and_optimizer(directory, self.model, self.optimizer)
        state = ckpt.load_file(directory, "trainer.pt")
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_configured_lr()
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", directory, self.step)

    def _apply_configured_lr(self) -> None:
        """The config, not the checkpoint, sets the schedule's peak: a run resumed with another
        train.lr continues on the new schedule at the same step (a no-op when lr is unchanged)."""
        self.scheduler.base_lrs = [self.cfg.train.lr] * len(self.optimizer.param_groups)
        with warnings.catch_warnings():  # get_lr() outside step() is what we mean here, not a mistake
            warnings.filterwarnings("ignore", message="To get the last learning rate computed by the scheduler")
            lrs = self.scheduler.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def train_step(self, means: DeviceMeans) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(self.accum_steps):
            indices = self.sampler.micro_batch_indices(self.step, self.rt.mesh.dp_rank, self.rt.mesh.dp_size,
                                                       micro, self.cfg.train.micro_batch_size)
            inputs, targets = self._batch(indices, "train")
            is_last = micro == self.accum_steps - 1
            with (contextlib.nullcontext() if is_last else self.plan.no_sync()):
                total, lm_loss, router_losses = self._forward_loss(inputs, targets)
                (total / self.accum_steps).backward()
            means.add({"train/loss": total, "train/lm_loss": lm_loss,
                       **{f"train/{name}": value for name, value in router_losses.items()}})
        self.plan.finish_gradient_sync()
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        if self._clips_inside_step:  # the optimizer's kernel scales the gradients as it reads them
            grad_norm = self.plan.grad_norm()
            set_clip_scale(self.optimizer, grad_norm, max_norm)
        else:
            grad_norm = self.plan.clip_grad_norm_(max_norm)
        means.add({"train/grad_norm": grad_norm})
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.plan.after_optimizer_step(self.model)
        adaptive.reset_pending_optimizer_state(self.model, self.optimizer)  # DynMoE slots changed this step
        self.step += 1
