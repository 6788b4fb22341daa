"""Which packed sequences each step, rank and micro-batch reads: pure functions of the step.

Training order. Epoch e is a permutation of all N training samples drawn by ``torch.randperm``
from a ``torch.Generator`` seeded with a hash of (seed, e). The epochs laid end to end form one
infinite stream; optimizer step s takes stream positions [s*G, (s+1)*G) (G = global batch size),
crossing epoch boundaries where needed. Nothing is stateful, so a run resumed at step s reads
exactly what an uninterrupted run reads, and every rank computes the same global batch alone.

Micro-batch rule. The global batch of G rows is consumed in A = G / (mbs * dp) accumulation
micro-steps on each of dp data-parallel ranks. Micro-step m of rank r reads rows
``[(m*dp + r)*mbs, (m*dp + r + 1)*mbs)`` of the global batch. So a single process (dp=1) running
A*dp micro-steps reads, in micro-step m' = m*dp + r, the very rows that rank r reads in
micro-step m: worked example, G=8, mbs=2, dp=2 (A=2) -> rank0: rows 0-1 then 4-5; rank1: rows
2-3 then 6-7; one process with A=4: rows 0-1, 2-3, 4-5, 6-7.

Validation (:func:`val_batches`) uses the same rule over the validation rows in order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

_CACHED_EPOCHS = 2


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch `epoch`: 63 bits of sha256("<seed>:<epoch>")."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GlobalBatchSampler:
    """Global batches of sample indices in [0, num_samples) for every optimizer step."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples <= 0:
            raise ValueError(f"GlobalBatchSampler: num_samples ({num_samples}) must be positive")
        if global_batch_size <= 0:
            raise ValueError(f"GlobalBatchSampler: global_batch_size ({global_batch_size}) must "
                             "be positive (train.global_batch_size)")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()  # memo only, not state

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The order of all samples in epoch `epoch` (LongTensor[num_samples])."""
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=generator)
            self._perms[epoch] = perm
            while len(self._perms) > _CACHED_EPOCHS:
                self._perms.popitem(last=False)
        return perm

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of optimizer step `step` (0-based): LongTensor[global_batch_size]."""
        if step < 0:
            raise ValueError(f"GlobalBatchSampler.indices: step ({step}) must be >= 0")
        size = self.global_batch_size
        positions = torch.arange(step * size, (step + 1) * size, dtype=torch.long)  # [G]
        epochs = positions // self.num_samples
        offsets = positions % self.num_samples
        out = torch.empty(size, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self.epoch_permutation(epoch)[offsets[mask]]
        return out

    def micro_batch_indices(self, step: int, dp_rank: int, dp_size: int, micro_step: int,
                            micro_batch_size: int) -> torch.Tensor:
        """Rows [(micro_step*dp_size + dp_rank)*mbs, +mbs) of step `step`'s global batch."""
        per_micro_step = micro_batch_size * dp_size
        if micro_batch_size <= 0 or dp_size <= 0 or self.global_batch_size % per_micro_step:
            raise ValueError(
                f"global batch size ({self.global_batch_size}) must be a positive multiple of "
                f"micro_batch_size ({micro_batch_size}) x dp_size ({dp_size}); fix "
                "train.global_batch_size or train.micro_batch_size")
        accumulation = self.global_batch_size // per_micro_step
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, {dp_size})")
        if not 0 <= micro_step < accumulation:
            raise ValueError(f"micro_step ({micro_step}) must be in [0, {accumulation}): "
                             f"{self.global_batch_size} / ({micro_batch_size} x {dp_size})")
        start = (micro_step * dp_size + dp_rank) * micro_batch_size
        return self.indices(step)[start: start + micro_batch_size]


def val_batches(val: object, micro_batch_size: int, num_batches: int, dp_rank: int,
                dp_size: int) -> list[torch.Tensor]:
    """The validation micro-batches of one rank: `num_batches` LongTensors of `micro_batch_size`
    indices into `val` (anything with ``len``). Batch b of rank r holds validation rows
    [(b*dp_size + r)*mbs, +mbs), modulo ``len(val)`` (rows repeat only when the validation set
    is smaller than num_batches*dp_size*mbs). Every rank gets the same number of batches, so
    collectives inside the forward pass stay matched; the union over ranks is the first
    num_batches*dp_size*mbs rows, which one process reads with num_batches*dp_size batches."""
    size = len(val)  # type: ignore[arg-type]
    if size <= 0:
        raise ValueError("val_batches: the validation set is empty")
    if micro_batch_size <= 0 or num_batches < 0:
        raise ValueError(f"val_batches: micro_batch_size ({micro_batch_size}) must be positive "
                         f"and num_batches ({num_batches}) >= 0")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"val_batches: dp_rank ({dp_rank}) must be in [0, {dp_size})")
    batches = []
    for b in range(num_batches):
        start = (b * dp_size + dp_rank) * micro_batch_size
        batches.append(torch.arange(start, start + micro_batch_size, dtype=torch.long) % size)
    return batches
