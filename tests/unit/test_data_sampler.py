"""GlobalBatchSampler and val_batches: pure functions of step, epoch wrap, micro-batch rule."""

from __future__ import annotations

import pytest
import torch

from moe_dist.data import GlobalBatchSampler, val_batches
from moe_dist.data.sampler import epoch_seed


def reference_perm(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def test_steps_walk_epoch_permutations_and_wrap() -> None:
    sampler = GlobalBatchSampler(num_samples=7, global_batch_size=5, seed=3)
    p0, p1, p2 = (reference_perm(7, 3, e) for e in range(3))
    assert sampler.indices(0).tolist() == p0[:5].tolist()
    assert sampler.indices(1).tolist() == p0[5:].tolist() + p1[:3].tolist()  # crosses epoch 0->1
    assert sampler.indices(2).tolist() == p1[3:].tolist() + p2[:1].tolist()
    assert sorted(p0.tolist()) == list(range(7)) and p0.tolist() != p1.tolist()


def test_each_epoch_visits_every_sample_once() -> None:
    sampler = GlobalBatchSampler(num_samples=12, global_batch_size=4, seed=0)
    epoch0 = torch.cat([sampler.indices(s) for s in range(3)])
    epoch1 = torch.cat([sampler.indices(s) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()


def test_batch_larger_than_dataset_spans_several_epochs() -> None:
    sampler = GlobalBatchSampler(num_samples=3, global_batch_size=8, seed=5)
    perms = [reference_perm(3, 5, e).tolist() for e in range(6)]
    flat = [i for p in perms for i in p]
    assert sampler.indices(1).tolist() == flat[8:16]


def test_resume_sees_the_same_samples() -> None:
    uninterrupted = GlobalBatchSampler(1000, 32, seed=42)
    history = [uninterrupted.indices(s) for s in range(40)]  # crosses an epoch boundary (31.25)
    for step in (0, 17, 31, 39):
        resumed = GlobalBatchSampler(1000, 32, seed=42)
        assert torch.equal(resumed.indices(step), history[step])
        assert resumed.indices(step).dtype == torch.long
    assert not torch.equal(GlobalBatchSampler(1000, 32, seed=43).indices(0), history[0])


def test_micro_batch_rule_and_single_process_equivalence() -> None:
    sampler = GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=1)
    full = sampler.indices(4).tolist()
    # dp=2, mbs=2, accumulation 2: micro-step m of rank r reads rows (m*2 + r)*2 .. +2
    assert sampler.micro_batch_indices(4, 0, 2, 0, 2).tolist() == full[0:2]
    assert sampler.micro_batch_indices(4, 1, 2, 0, 2).tolist() == full[2:4]
    assert sampler.micro_batch_indices(4, 0, 2, 1, 2).tolist() == full[4:6]
    assert sampler.micro_batch_indices(4, 1, 2, 1, 2).tolist() == full[6:8]
    for dp in (1, 2, 4):
        accumulation = 8 // (2 * dp)
        interleaved = [sampler.micro_batch_indices(4, r, dp, m, 2).tolist()
                       for m in range(accumulation) for r in range(dp)]
        single = [sampler.micro_batch_indices(4, 0, 1, m, 2).tolist() for m in range(4)]
        assert interleaved == single


def test_bad_sampler_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_samples \(0\) must be positive"):
        GlobalBatchSampler(0, 4, 0)
    with pytest.raises(ValueError, match=r"global_batch_size \(0\) must be positive"):
        GlobalBatchSampler(4, 0, 0)
    sampler = GlobalBatchSampler(10, 8, 0)
    with pytest.raises(ValueError, match=r"step \(-1\) must be >= 0"):
        sampler.indices(-1)
    with pytest.raises(ValueError, match=r"global batch size \(8\) must be a positive multiple of "
                                         r"micro_batch_size \(3\) x dp_size \(1\)"):
        sampler.micro_batch_indices(0, 0, 1, 0, 3)
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, 2\)"):
        sampler.micro_batch_indices(0, 2, 2, 0, 2)
    with pytest.raises(ValueError, match=r"micro_step \(2\) must be in \[0, 2\)"):
        sampler.micro_batch_indices(0, 0, 2, 2, 2)


def test_val_batches_rule_wrap_and_dp_union() -> None:
    val = list(range(10))  # only len() is used
    rank1 = val_batches(val, micro_batch_size=3, num_batches=2, dp_rank=1, dp_size=2)
    assert [b.tolist() for b in rank1] == [[3, 4, 5], [9, 0, 1]]  # rows 9, 10%10, 11%10
    single = val_batches(val, 3, 4, 0, 1)
    ranks = [val_batches(val, 3, 2, r, 2) for r in range(2)]
    assert [b.tolist() for b in single] == [ranks[r][b].tolist() for b in range(2) for r in range(2)]
    assert [b.tolist() for b in val_batches(val, 3, 2, 0, 1)] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="validation set is empty"):
        val_batches([], 2, 1, 0, 1)
