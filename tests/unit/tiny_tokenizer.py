"""A Hugging Face tokenizer that a test trains and saves itself (no download): a byte-level BPE
trained with ``tokenizers`` on a few lines, wrapped by transformers and written with
``save_pretrained``, as a user's own tokenizer directory would be."""

from __future__ import annotations

from pathlib import Path

CORPUS = ["To be, or not to be, that is the question:",
          "Whether 'tis nobler in the mind to suffer",
          "The slings and arrows of outrageous fortune,",
          "Or to take arms against a sea of troubles"]


def train_tiny_bpe(vocab_size: int = 300, adds: str = "", texts: list[str] | None = None):
    """A ``tokenizers.Tokenizer`` with special tokens <s> (id 0) and </s> (id 1); `adds` is what
    its post-processor puts around a text: '' nothing, 'bos' a leading <s>, 'eos' a trailing </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([texts or CORPUS * 4], trainer=trainer)
    if adds:
        single = "<s> $A" if adds == "bos" else "$A </s>"
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
    return tok


def save_tiny_tokenizer(directory: Path, vocab_size: int = 300, adds: str = "", eos: bool = True) -> Path:
    """The tiny BPE saved as a transformers tokenizer directory (tokenizer.json +
    tokenizer_config.json); `eos` False leaves it without an EOS token."""
    from transformers import PreTrainedTokenizerFast

    specials = {"bos_token": "<s>", **({"eos_token": "</s>"} if eos else {})}
    PreTrainedTokenizerFast(tokenizer_object=train_tiny_bpe(vocab_size, adds), **specials).save_pretrained(directory)
    return Path(directory)
