"""train.profile_steps: parsing and its error, and StepProfiler tracing exactly the asked steps of
a real model into the run directory, with the MoE modules labelled."""

from __future__ import annotations

import json

import pytest
import torch

from moe_dist.config import ConfigError, load_config
from moe_dist.config.run import TrainConfig, parse_profile_steps
from moe_dist.models.registry import build_model
from moe_dist.train.profiling import StepProfiler, trace_path
from moe_dist.train.run_dir import config_differences

TINY = ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=32", "model.vocab_size=32",
        "model.max_seq_len=8", "data.seq_len=8", "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=16"]


def test_profile_steps_parse_and_bad_values_name_the_key():
    assert parse_profile_steps("10-12") == (10, 12)
    assert parse_profile_steps(" 7 ") == (7, 7)
    assert parse_profile_steps("") == (0, 0)
    for bad in ("abc", "12-10", "0", "0-3", "3-", "10:12"):
        with pytest.raises(ConfigError, match=rf"train.profile_steps \('{bad}'\) must be 'FIRST-LAST'.*'10-12'"):
            parse_profile_steps(bad)
    with pytest.raises(ConfigError, match=r"train.profile_steps \('18-22'\) reaches past train.steps \(20\)"):
        TrainConfig(steps=20, profile_steps="18-22")
    cfg = load_config(None, ["train.steps=20", "train.profile_steps=5"])  # a bare number from the CLI
    assert cfg.train.profile_steps == "5"


def _events(path):
    return json.loads(path.read_text())["traceEvents"]


def _run_steps(profiler, model, steps):
    tokens = torch.randint(0, 32, (2, 8))
    for step in steps:
        with profiler.step(step):
            output = model(tokens)
            output.logits.float().mean().backward()


def test_only_the_asked_steps_are_traced_with_labelled_moe_modules(tmp_path):
    cfg = load_config(None, [*TINY, "train.steps=5", "train.profile_steps=2-3"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    profiler = StepProfiler.from_config(cfg.train, tmp_path, rank=0, device=torch.device("cpu"), model=model)
    _run_steps(profiler, model, range(1, 6))
    path = trace_path(tmp_path / "profile", 0, 2, 3)
    assert profiler.written == path and path.name == "rank0_steps2-3.pt.trace.json"
    assert sorted((tmp_path / "profile").iterdir()) == [path]
    names = {event.get("name", "") for event in _events(path)}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names
    assert not {"ProfilerStep#1", "ProfilerStep#4", "ProfilerStep#5"} & names
    for label in ("layers.1.mlp [MoELayer]", "layers.1.mlp.router [TopKRouter]",
                  "layers.1.mlp.experts [GroupedExperts]", "layers.0.attention [Attention]"):
        assert label in names, label
    assert any(name.startswith("aten::") for name in names)  # the ops themselves
    # The labels are removed with the profiler: no hooks stay on the model.
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_other_ranks_and_a_run_stopped_inside_the_range(tmp_path):
    cfg = load_config(None, [*TINY, "train.steps=6", "train.profile_steps=2-5"])
    model = build_model(cfg.model, cfg.moe)
    rank1 = StepProfiler.from_config(cfg.train, tmp_path, rank=1, device=torch.device("cpu"), model=model)
    assert not rank1.enabled  # rank 0 only, unless train.profile_all_ranks
    cfg.train.profile_all_ranks = True
    rank1 = StepProfiler.from_config(cfg.train, tmp_path, rank=1, device=torch.device("cpu"), model=model)
    _run_steps(rank1, model, range(3, 5))  # resumed at step 3, preempted after step 4
    rank1.close()
    assert rank1.written == tmp_path / "profile" / "rank1_steps3-4.pt.trace.json"
    names = {event.get("name", "") for event in _events(rank1.written)}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= names
    off = StepProfiler.from_config(TrainConfig(), tmp_path / "off", rank=0, device=torch.device("cpu"))
    _run_steps(off, model, range(1, 3))
    assert not off.enabled and not (tmp_path / "off").exists()


def test_a_resumed_run_may_change_what_it_profiles():
    old = load_config(None, ["train.steps=20"]).to_dict()
    new = load_config(None, ["train.steps=20", "train.profile_steps=3-4", "train.profile_all_ranks=true"]).to_dict()
    assert config_differences(old, new) == []  # not "a different run"
