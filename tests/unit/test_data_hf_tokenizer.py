"""``data.tokenizer`` set to a Hugging Face tokenizer: a directory the test saves itself, a bare
tokenizer.json, a hub name found in the (test's own) hub cache, and the offline error.

The tokenizer is trained and saved here (tests/unit/tiny_tokenizer.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moe_dist.config import DataConfig, load_config
from moe_dist.data import DataError, HFTokenizer, build_datasets, check_data
from moe_dist.distributed.launch_env import LaunchEnv
from tests.unit.tiny_tokenizer import CORPUS, save_tiny_tokenizer

transformers = pytest.importorskip("transformers")

DOCS = [CORPUS[0] + " " + CORPUS[1], CORPUS[2], CORPUS[3] * 3]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    if not path.exists():  # written once: a new mtime would be a new source identity
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def _cfg(tmp_path: Path, tokenizer: str, **kw) -> DataConfig:
    return DataConfig(source=str(_corpus(tmp_path)), tokenizer=tokenizer, seq_len=8, val_fraction=0.2,
                      cache_dir=str(tmp_path / "cache"), **kw)


def _stream(bundle) -> list[int]:
    return np.asarray(bundle.train.tokens).reshape(-1).tolist()


@pytest.mark.parametrize("adds", ["", "bos", "eos"])
def test_documents_are_encoded_as_autotokenizer_does_each_followed_by_one_eos(tmp_path, adds):
    directory = save_tiny_tokenizer(tmp_path / "tok", adds=adds)
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    bundle = build_datasets(_cfg(tmp_path, str(directory)))
    want: list[int] = []
    for doc in DOCS:
        ids = auto(doc).input_ids  # with the tokenizer's own BOS, if it adds one
        want += ids if ids[-1] == auto.eos_token_id else ids + [auto.eos_token_id]
    rows = len(want) // 9
    assert _stream(bundle) == want[: rows * 9]  # packed rows of seq_len + 1, the tail dropped
    assert bundle.vocab_size == bundle.tokenizer.vocab_size == len(auto) == 300
    assert bundle.tokenizer.eod_id == auto.eos_token_id == 1
    assert want.count(1) == len(DOCS)  # exactly one EOS per document, also when the tokenizer adds one
    assert bundle.tokenizer.decode(auto(CORPUS[2], add_special_tokens=False).input_ids) == CORPUS[2]


def test_model_vocab_size_zero_takes_the_tokenizers(tok_dir, tmp_path):
    """What the trainer does with model.vocab_size (trainer.py): 0 becomes the bundle's vocabulary."""
    cfg = load_config(None, [f"data.source={_corpus(tmp_path)}", f"data.tokenizer={tok_dir}", "data.seq_len=8",
                             f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=0"])
    bundle = build_datasets(cfg.data, cfg.model.vocab_size)
    assert cfg.model.vocab_size == 0 and bundle.vocab_size == 300


def test_cache_key_follows_the_tokenizer_content_not_its_path(tok_dir, tmp_path):
    first = build_datasets(_cfg(tmp_path, str(tok_dir)))
    copy = shutil.copytree(tok_dir, tmp_path / "elsewhere")
    again = build_datasets(_cfg(tmp_path, str(copy)))
    assert again.cache_hit and again.cache_path == first.cache_path
    other = build_datasets(_cfg(tmp_path, str(save_tiny_tokenizer(tmp_path / "bigger", vocab_size=310))))
    with_bos = build_datasets(_cfg(tmp_path, str(save_tiny_tokenizer(tmp_path / "bos", adds="bos"))))
    byte = build_datasets(_cfg(tmp_path, "byte"))
    assert len({first.cache_path, other.cache_path, with_bos.cache_path, byte.cache_path}) == 4
    assert not other.cache_hit and not with_bos.cache_hit


def test_a_bare_tokenizer_json_is_read_with_tokenizers_and_its_eos_found(tok_dir, tmp_path):
    bundle = build_datasets(_cfg(tmp_path, str(tok_dir / "tokenizer.json")))
    auto = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert bundle.tokenizer.eod_id == 1 and bundle.vocab_size == 300  # '</s>' from EOS_CANDIDATES
    assert _stream(bundle)[: len(auto(DOCS[0]).input_ids) + 1] == auto(DOCS[0]).input_ids + [1]


def _hub_cache(root: Path, repo: str, files_from: Path) -> Path:
    """The layout huggingface_hub gives a download: models--org--name/{refs/main, snapshots/<rev>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(files_from, repo_dir / "snapshots" / commit)
    # a hub repository holds the model's config.json too, which AutoTokenizer reads for a hub name
    transformers.LlamaConfig(vocab_size=300).save_pretrained(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_a_hub_name_is_found_in_the_hub_cache_offline(tok_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "local/tiny", tok_dir)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bundle = build_datasets(_cfg(tmp_path, "local/tiny"))
    assert bundle.vocab_size == 300
    assert bundle.tokenizer.fingerprint == HFTokenizer(str(tok_dir)).fingerprint


def _env(world_size: int) -> LaunchEnv:
    return LaunchEnv(rank=0, world_size=world_size, local_rank=0, local_world_size=world_size, node_rank=0,
                     master_addr="127.0.0.1", master_port=29999, launcher="torchrun")


def test_an_uncached_hub_name_offline_fails_before_any_process_group(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from moe_dist.train.runtime import build_runtime

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(None, ["data.tokenizer=gpt2", "data.max_documents=1"])
    message = (r"^data\.tokenizer = 'gpt2' is not a local path and not in the Hugging Face hub cache \(.*empty-hub\), "
               r"and the hub is offline \(HF_HUB_OFFLINE=1\); download it where the hub is reachable \(hf download "
               r"gpt2, or AutoTokenizer\.from_pretrained\('gpt2'\)\.save_pretrained\(DIR\) and set "
               r"data\.tokenizer=DIR\), or unset HF_HUB_OFFLINE$")
    with pytest.raises(DataError, match=message):
        build_runtime(cfg, _env(2))
    assert not dist.is_initialized(), "the data error must come before init_process_group"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "no" / "such" / "dir", r"^data\.tokenizer = '.*/no/such/dir': no such file or directory"),
    (lambda tmp: tmp, r"is a directory without tokenizer\.json or tokenizer_config\.json; point it at a directory "
                      r"written by tokenizer\.save_pretrained\(DIR\)"),
    (lambda tmp: Path(shutil.copy(_corpus(tmp), tmp / "vocab.txt")), r"is a file but not a tokenizers \.json file"),
    (lambda tmp: _corpus(tmp).with_suffix(".json"), r"no such file or directory"),
])
def test_paths_that_hold_no_tokenizer_are_named(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        check_data(_cfg(tmp_path, str(make(tmp_path))))


def test_a_tokenizer_without_eos_cannot_separate_text_documents(tmp_path):
    no_eos = save_tiny_tokenizer(tmp_path / "no_eos", eos=False)
    with pytest.raises(DataError, match=r"^data\.tokenizer = '.*no_eos' has no EOS token, which moe_dist puts "
                                        r"between documents; give the tokenizer one"):
        build_datasets(_cfg(tmp_path, str(no_eos)))


def test_a_broken_tokenizer_file_is_a_data_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"is not a tokenizers file"):
        HFTokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match=r"AutoTokenizer cannot load it"):
        HFTokenizer(str(tmp_path))


def test_none_and_empty_are_refused_for_text(tmp_path):
    with pytest.raises(DataError, match=r"^data\.tokenizer = 'none' works only with pretokenized data"):
        check_data(_cfg(tmp_path, "none"), model_vocab_size=300)
    with pytest.raises(ValueError, match=r"data\.tokenizer is empty"):
        DataConfig(tokenizer=" ")


def test_batches_of_an_hf_run_are_in_range_for_the_embedding(tok_dir, tmp_path):
    bundle = build_datasets(_cfg(tmp_path, str(tok_dir)))
    batch = bundle.train.get(torch.arange(len(bundle.train)))
    assert batch.dtype == torch.int64 and int(batch.max()) < bundle.vocab_size


def test_dry_run_estimates_count_the_tokenizers_vocabulary(tok_dir):
    from moe_dist.data.tokenizer import nominal_vocab_size
    from moe_dist.train.memory import estimate_memory

    small = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=32", "moe.num_experts=0"]
    with_hf = estimate_memory(load_config(None, [*small, f"data.tokenizer={tok_dir}"]), 1)
    with_bytes = estimate_memory(load_config(None, [*small, "data.tokenizer=byte"]), 1)
    assert nominal_vocab_size(DataConfig(tokenizer=str(tok_dir))) == 300
    # embedding and (untied) output head: 2 x dim per vocabulary entry
    assert with_hf.total_params - with_bytes.total_params == 2 * 16 * (300 - 256)


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused_up_front(tok_dir, tmp_path):
    with pytest.raises(DataError, match=r"^model\.vocab_size \(299\) is smaller than the vocabulary of "
                                        r"data\.tokenizer = '.*tiny' \(300\); set model\.vocab_size=0 to take it from "
                                        r"the tokenizer, or to at least 300$"):
        check_data(_cfg(tmp_path, str(tok_dir)), model_vocab_size=299)
    with pytest.raises(DataError, match=r"smaller than the vocabulary of data\.tokenizer = 'byte' \(256\)"):
        check_data(_cfg(tmp_path, "byte"), model_vocab_size=200)
    check_data(_cfg(tmp_path, str(tok_dir)), model_vocab_size=320)  # padding the vocabulary is fine
    assert build_datasets(_cfg(tmp_path, str(tok_dir)), model_vocab_size=320).vocab_size == 300


def test_long_documents_are_not_warned_about(tmp_path, caplog):
    """transformers warns when a text exceeds model_max_length; documents are packed, so not here."""
    directory = save_tiny_tokenizer(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4}))
    with caplog.at_level("WARNING"):
        bundle = build_datasets(_cfg(tmp_path, str(directory)))
    assert len(bundle.train) > 0 and "longer than the specified maximum sequence length" not in caplog.text
    assert HFTokenizer(str(directory))._tok.model_max_length == 4


def test_without_transformers_a_directory_says_to_install_the_extra(tok_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(DataError, match=r"needs transformers, which is not installed: pip install -e '\.\[hf\]' "
                                        r"\(scripts/install\.sh installs it\); or point data\.tokenizer at a "
                                        r"tokenizer\.json file"):
        HFTokenizer(str(tok_dir))
    assert HFTokenizer(str(tok_dir / "tokenizer.json")).vocab_size == 300  # the tokenizers library alone


def test_report_counts_parameters_with_the_tokenizers_vocabulary(tok_dir, tmp_path):
    from moe_dist.report import count_model

    small = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=32", "moe.num_experts=0"]
    total_hf = count_model(load_config(None, [*small, f"data.tokenizer={tok_dir}"]), None)[0]
    total_set = count_model(load_config(None, [*small, "model.vocab_size=300"]), None)[0]
    assert total_hf == total_set
    gone = count_model(load_config(None, [*small, f"data.tokenizer={tmp_path / 'gone'}"]), None)
    assert gone == (None, None, None, None)  # the tokenizer is not there any more: blank, not a crash
