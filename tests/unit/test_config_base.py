"""Training configs inherit (``base: tiny.yaml``), as sweep files do; the seed-architecture
configs are tiny.yaml plus what they change."""

from __future__ import annotations

import pytest
import yaml

from moe_dist.config import CONFIG_DIR, ConfigError, load_config
from moe_dist.train.run_dir import flatten_config


def test_a_config_inherits_its_base_section_by_section(tmp_path):
    (tmp_path / "root.yaml").write_text("model: {dim: 64, n_heads: 4}\ntrain: {steps: 7, lr: 0.01}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nmodel: {dim: 32}\nmoe: {num_experts: 4}\n")
    (tmp_path / "child.yaml").write_text("base: sub/mid.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=0.02"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.moe.num_experts) == (32, 4, 4)  # base of base, then base
    assert (cfg.train.steps, cfg.train.lr) == (9, 0.02)  # own key, then the command line


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base = 'a.yaml' makes a circle .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml' does not exist.*\(the base of config file .*c.yaml'\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [tiny.yaml]\n")
    with pytest.raises(ConfigError, match=r"base = \['tiny.yaml'\] must be the path of the config file"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("name", ["mh_moe", "moa", "peer", "stratified", "switchhead"])
def test_seed_architecture_configs_are_tiny_plus_their_changes(name):
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert raw["base"] == "tiny.yaml"
    assert set(raw) <= {"base", "model", "train", "checkpoint"}  # no copy of tiny's moe, data or log
    tiny = flatten_config(load_config(CONFIG_DIR / "tiny.yaml").to_dict())
    own = flatten_config(load_config(CONFIG_DIR / f"{name}.yaml").to_dict())
    changed = {key for key in own if own[key] != tiny[key]}
    assert changed >= {"model.arch"} and all(key.startswith(("model.", "train.", "checkpoint.")) for key in changed)
    assert own["model.dim"] == tiny["model.dim"] and own["moe.num_experts"] == tiny["moe.num_experts"]
