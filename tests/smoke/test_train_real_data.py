"""``moe-dist train`` on real-world data formats, end to end (one CPU process each):

* a Hugging Face tokenizer directory the test saves itself, with model.vocab_size=0: the model's
  vocabulary is the tokenizer's;
* a Megatron .bin/.idx written by megatron-core's builder, with data.tokenizer=none and
  model.vocab_size set;
* a hub tokenizer name offline and not cached: exit status 2 and the message, nothing trained.
"""

from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pytest
import torch

from moe_dist.train.checkpoint_reader import read_checkpoint
from tests.smoke.conftest import REPO, read_metrics, run_train, train_command, train_env
from tests.unit.tiny_tokenizer import CORPUS, save_tiny_tokenizer

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

SHORT = ["train.steps=3", "train.eval_every=3", "checkpoint.every=3", "data.seq_len=16", "log.every=1"]


def _final_step(run_dir) -> dict:
    return [r for r in read_metrics(run_dir) if "loss" in r][-1]


def test_hf_tokenizer_run_takes_the_vocabulary_from_the_tokenizer(tmp_path):
    tok_dir = save_tiny_tokenizer(tmp_path / "tok")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(CORPUS[i:] + CORPUS[:i])}) + "\n" for i in range(4)) * 4)
    run = tmp_path / "run"
    result = run_train(run, *SHORT, f"data.source={corpus}", f"data.tokenizer={tok_dir}", "data.max_documents=0",
                       f"data.cache_dir={tmp_path / 'cache'}")
    assert "vocab 300" in result.stderr + result.stdout
    _, cfg, state = read_checkpoint(run)
    assert cfg.model.vocab_size == 300 and state["tok_embeddings.weight"].shape[0] == 300
    assert np.isfinite(_final_step(run)["loss"])


def test_megatron_dataset_run_with_the_vocabulary_from_the_config(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "corpus_text_document.bin"), dtype=np.uint16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        builder.add_item(torch.cat([torch.randint(2, 96, (30,), generator=generator), torch.tensor([1])]))
        builder.end_document()
    builder.finalize(str(tmp_path / "corpus_text_document.idx"))
    run = tmp_path / "run"
    result = run_train(run, *SHORT, f"data.source=megatron:{tmp_path / 'corpus_text_document'}", "data.tokenizer=none",
                       "model.vocab_size=96", "data.max_documents=0", f"data.cache_dir={tmp_path / 'cache'}")
    assert "vocab 96" in result.stderr + result.stdout
    _, cfg, state = read_checkpoint(run)
    assert cfg.model.vocab_size == 96 and state["tok_embeddings.weight"].shape[0] == 96
    assert np.isfinite(_final_step(run)["loss"])


def test_uncached_hub_tokenizer_offline_exits_2_before_training(tmp_path):
    command = train_command(tmp_path / "run", "data.tokenizer=gpt2")
    result = subprocess.run(command, cwd=REPO, env=train_env(HF_HUB_CACHE=str(tmp_path / "hub")),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("moe-dist: config error: data.tokenizer = 'gpt2' is not a local path and not in the Hugging Face hub "
            f"cache ({tmp_path / 'hub'}), and the hub is offline (HF_HUB_OFFLINE=1)") in result.stderr
    assert not (tmp_path / "run").exists()
