"""Data pipeline: sources -> tokenizer -> packed fixed-length sequences -> deterministic batches.

The trainer uses exactly this API (see docs/data.md):

* ``check_data(cfg.data, model_vocab_size)``: the checks that need no data (every rank, before
  any process group);
* ``build_datasets(cfg.data, model_vocab_size) -> DataBundle`` with ``tokenizer``, ``vocab_size``,
  ``train``, ``val``;
  ``bundle.train.get(indices)`` returns LongTensor[B, seq_len + 1];
* ``GlobalBatchSampler(len(bundle.train), global_batch_size, seed)`` with ``indices(step)`` and
  ``micro_batch_indices(step, dp_rank, dp_size, micro_step, micro_batch_size)``;
* ``val_batches(bundle.val, micro_batch_size, num_batches, dp_rank, dp_size)``.
"""

from moe_dist.data.errors import DataError
from moe_dist.data.hf_tokenizer import HFTokenizer
from moe_dist.data.pipeline import DataBundle, PackedSequences, build_datasets, check_data
from moe_dist.data.sampler import GlobalBatchSampler, val_batches
from moe_dist.data.tokenizer import BPETokenizer, ByteTokenizer, TextTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataBundle",
    "DataError",
    "GlobalBatchSampler",
    "HFTokenizer",
    "PackedSequences",
    "TextTokenizer",
    "build_datasets",
    "check_data",
    "val_batches",
]
