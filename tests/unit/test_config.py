"""Config loading: precedence, strict keys, types and cross-section validation messages."""

import pytest

from moe_dist.config import (Config, ConfigError, config_from_dict, grad_accum_steps, load_config,
                             validate)


def test_default_config_is_tiny_and_overrides_win(tmp_path):
    cfg = load_config(None, ["moe.num_experts=16", "train.steps=200", "moe.router.top_k=1"])
    assert cfg.moe.num_experts == 16 and cfg.train.steps == 200 and cfg.moe.router.top_k == 1
    assert cfg.model.dim == 128  # from configs/tiny.yaml, not the dataclass default


def test_yaml_beats_defaults_and_cli_beats_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 9
    assert cfg.train.global_batch_size == Config().train.global_batch_size


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'moe.num_expert'.*did you mean 'moe.num_experts'"):
        load_config(None, ["moe.num_expert=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        config_from_dict({"trian": {"steps": 1}})


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", r"train.steps = 'abc' must be an integer"),
    ("train.lr=fast", r"train.lr = 'fast' must be a number"),
    ("log.tensorboard=3", r"log.tensorboard = 3 must be true or false"),
    ("moe.router.type=softmax", r"moe.router.type = 'softmax' is not one of .*did you mean 'softmax_topk'"),
    ("moe.router.top_k=9", r"moe.router.top_k \(9\) cannot exceed moe.num_experts \(8\)"),
    ("data.seq_len=512", r"data.seq_len \(512\) exceeds model.max_seq_len \(256\)"),
    ("model.n_heads=5", r"model.dim \(128\) must be divisible by model.n_heads \(5\)"),
    ("train.steps", r"must look like section.key=value"),
])
def test_bad_values_name_field_value_and_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_scientific_notation_without_dot_is_a_float():
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


def test_missing_config_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match=r"does not exist; shipped configs: .*tiny.yaml"):
        load_config("nope.yaml")


def test_validate_mesh_sizes():
    cfg = load_config(None, ["parallel.ep=3"])
    with pytest.raises(ConfigError, match=r"parallel.ep \(3\) x parallel.etp \(1\) = 3 must divide the world size \(4\)"):
        validate(cfg, 4)
    cfg = load_config(None, ["moe.num_experts=6", "parallel.ep=4"])
    with pytest.raises(ConfigError, match=r"moe.num_experts \(6\) must be divisible by parallel.ep \(4\); use ep in \[1, 2\] or num_experts=8"):
        validate(cfg, 4)
    cfg = load_config(None, ["parallel.tp=3"])
    with pytest.raises(ConfigError, match=r"parallel.dp \(1\) x parallel.tp \(3\) = 3 must equal the world size \(4\)"):
        validate(cfg, 4)
    cfg = load_config(None, ["train.global_batch_size=12", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(12\) must be divisible by .* = 16; use global_batch_size=16"):
        validate(cfg, 4)


def test_expert_tensor_parallelism_validation():
    validate(load_config(None, ["parallel.etp=2"]), 2)
    validate(load_config(None, ["parallel.etp=2", "parallel.ep=2"]), 4)
    cfg = load_config(None, ["parallel.etp=4", "moe.expert_ffn_dim=30"])
    with pytest.raises(ConfigError, match=r"^moe.expert_ffn_dim \(30\) must be divisible by parallel.etp \(4\): "
                                          r".*; use etp in \[2\] or moe.expert_ffn_dim=32$"):
        validate(cfg, 4)
    cfg = load_config(None, ["parallel.etp=2", "model.ffn_dim=33", "moe.expert_ffn_dim=0"])
    with pytest.raises(ConfigError, match=r"^model.ffn_dim \(33, the experts' FFN as moe.expert_ffn_dim=0\) must "
                                          r"be divisible by parallel.etp \(2\).*; use etp in \[1\] or "
                                          r"moe.expert_ffn_dim=34$"):
        validate(cfg, 4)
    cfg = load_config(None, ["parallel.etp=3"])
    with pytest.raises(ConfigError, match=r"parallel.ep \(1\) x parallel.etp \(3\) = 3 must divide the world size "
                                          r"\(4\); use etp in \[1, 2, 4\]"):
        validate(cfg, 4)
    refusals = {("parallel.fsdp=true",): r"parallel.fsdp=true with parallel.etp \(2\) > 1 is not supported",
                ("train.engine=deepspeed", "zero.stage=1"):
                    r"train.engine=deepspeed with parallel.etp \(2\) > 1 is not supported: .*use train.engine=native",
                ("model.arch=peer",): r"parallel.etp \(2\) > 1 with model.arch=peer: only the plain transformer",
                ("moe.num_experts=0",): r"parallel.etp \(2\) > 1 needs an MoE model"}
    for overrides, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            validate(load_config(None, ["parallel.etp=2", *overrides]), 4)


def test_accumulation_keeps_the_global_batch():
    cfg = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=2"])
    validate(cfg, 1)
    validate(cfg, 4)
    assert grad_accum_steps(cfg, 1) == 8 and grad_accum_steps(cfg, 4) == 2


def test_print_config_round_trips(capsys):
    from moe_dist.cli import main

    assert main(["train", "--print-config", "moe.num_experts=4", "moe.router.top_k=1"]) == 0
    text = capsys.readouterr().out
    import yaml

    again = config_from_dict(yaml.safe_load(text))
    assert again.moe.num_experts == 4 and again == load_config(None, ["moe.num_experts=4", "moe.router.top_k=1"])


def test_overrides_may_follow_flags(capsys):
    from moe_dist.cli import main

    assert main(["train", "moe.num_experts=4", "--print-config", "moe.router.top_k=1"]) == 0
    import yaml

    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert printed.moe.num_experts == 4 and printed.moe.router.top_k == 1


@pytest.mark.parametrize("arch", ["hmoe", "moa"])
def test_new_architectures_are_refused_under_deepspeed(arch):
    from moe_dist.config import validate

    cfg = load_config(None, [f"model.arch={arch}", "train.engine=deepspeed"])
    with pytest.raises(ConfigError, match=f"model.arch={arch} is not supported.*train.engine=native"):
        validate(cfg, 2)
