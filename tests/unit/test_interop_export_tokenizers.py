"""``moe-dist export`` of runs trained with a Hugging Face tokenizer or on pretokenized ids
(``data.tokenizer: none``): the export carries the run's tokenizer, or none, and a matching
generation_config."""

from __future__ import annotations

import json

import pytest

from moe_dist.interop.export import export_checkpoint
from tests.unit.test_interop_export import save_native_checkpoint
from tests.unit.tiny_tokenizer import CORPUS, save_tiny_tokenizer

transformers = pytest.importorskip("transformers")


def test_a_hugging_face_tokenizer_is_exported_as_it_is(tmp_path):
    tok_dir = save_tiny_tokenizer(tmp_path / "tok", adds="bos")
    save_native_checkpoint(tmp_path / "run", f"data.tokenizer={tok_dir}", "model.vocab_size=300")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert exported(CORPUS).input_ids == original(CORPUS).input_ids and exported(CORPUS[0]).input_ids[0] == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"eos_token_id": 1,
                                                                                    "pad_token_id": 1}
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == 300


def test_pretokenized_runs_export_no_tokenizer(tmp_path, caplog):
    save_native_checkpoint(tmp_path / "run", "data.tokenizer=none", "model.vocab_size=300")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert "no tokenizer files are written" in caplog.text
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] is None
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_a_missing_tokenizer_directory_stops_the_export_before_it_writes(tmp_path):
    from moe_dist.data import DataError

    save_native_checkpoint(tmp_path / "run", f"data.tokenizer={tmp_path / 'gone'}", "model.vocab_size=300")
    with pytest.raises(DataError, match=r"^data\.tokenizer = '.*gone': no such file or directory"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
