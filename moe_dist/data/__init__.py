"""Data pipeline: sources -> tokenizer -> packed fixed-length sequences -> deterministic batches.

The trainer uses exactly this API (see docs/data.md):

* ``build_datasets(cfg.data) -> DataBundle`` with ``tokenizer``, ``vocab_size``, ``train``, ``val``;
  ``bundle.train.get(indices)`` returns LongTensor[B, seq_len + 1];
* ``GlobalBatchSampler(len(bundle.train), global_batch_size, seed)`` with ``indices(step)`` and
  ``micro_batch_indices(step, dp_rank, dp_size, micro_step, micro_batch_size)``;
* ``val_batches(bundle.val, micro_batch_size, num_batches, dp_rank, dp_size)``.
"""

from moe_dist.data.errors import DataError
from moe_dist.data.pipeline import DataBundle, PackedSequences, build_datasets
from moe_dist.data.sampler import GlobalBatchSampler, val_batches
from moe_dist.data.tokenizer import BPETokenizer, ByteTokenizer, TextTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataBundle",
    "DataError",
    "GlobalBatchSampler",
    "PackedSequences",
    "TextTokenizer",
    "build_datasets",
    "val_batches",
]
