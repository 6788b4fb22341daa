"""The per-rank memory estimate (moe_dist/train/memory.py) against hand-computed counts, and a dry
run of every shipped config at the world size its comment documents."""

import re
from pathlib import Path

import pytest

from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.train.memory import GIB, estimate_memory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# dim 16, 2 blocks (block 1 MoE), 4 heads, ffn 32, 4 experts of width 8, vocab 64.
SMALL = ["model.dim=16", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=32", "model.vocab_size=64",
         "moe.num_experts=4", "moe.every=2", "moe.expert_ffn_dim=8", "moe.router.top_k=2",
         "data.seq_len=8", "train.micro_batch_size=2", "train.global_batch_size=8", "train.dtype=fp32"]
D, F, E, FE, V = 16, 32, 4, 8, 64
EMBED = OUTPUT = V * D
ATTENTION = 4 * D * D
NORMS = 2 * D
DENSE_MLP = 3 * D * F
ROUTER = E * D
EXPERTS = E * 3 * D * FE  # w13 [E, D, 2F] + w2 [E, F, D]
TOTAL = EMBED + OUTPUT + D + 2 * (ATTENTION + NORMS) + DENSE_MLP + ROUTER + EXPERTS


def _estimate(*overrides, world_size=1, checkpointing="none"):
    return estimate_memory(load_config(None, [*SMALL, *overrides]), world_size, checkpointing=checkpointing)


def test_single_process_counts_every_parameter_at_16_bytes():
    est = _estimate()
    assert est.total_params == TOTAL and est.rank_params == TOTAL
    assert est.active_params == TOTAL - EXPERTS // 2  # top-2 of 4 experts
    assert (est.params, est.gradients, est.optimizer) == (4 * TOTAL, 4 * TOTAL, 8 * TOTAL)


def test_expert_and_tensor_parallel_shards():
    ep = _estimate("parallel.ep=2", world_size=2)
    assert ep.rank_params == TOTAL - EXPERTS // 2
    tp = _estimate("parallel.tp=2", world_size=2)
    sharded = EMBED + OUTPUT + 2 * ATTENTION + DENSE_MLP  # the MoE block's experts and router stay whole
    assert tp.rank_params == TOTAL - sharded // 2


def test_zero_stages_partition_optimizer_then_gradients():
    base = ["train.engine=deepspeed", "train.dtype=bf16", "parallel.ep=2"]
    dense, experts = TOTAL - EXPERTS, EXPERTS // 2  # per rank, world 4: dp 4, edp 2
    stage1 = _estimate(*base, "zero.stage=1", world_size=4)
    assert stage1.params == 2 * (dense + experts)
    assert stage1.gradients == 2 * (dense + experts)
    assert stage1.optimizer == pytest.approx(12 * dense / 4 + 12 * experts / 2)
    stage2 = _estimate(*base, "zero.stage=2", world_size=4)
    assert stage2.gradients == pytest.approx(2 * dense / 4 + 2 * experts / 2)
    offload = _estimate(*base, "zero.stage=2", "zero.offload_optimizer=true", world_size=4)
    assert offload.optimizer == 0 and offload.optimizer_on_host == pytest.approx(stage2.optimizer)


def test_activations_follow_the_token_count_and_the_checkpointing_mode():
    tokens = 2 * 8
    attention = 4 * D + 7 * D * 4
    dense_block = attention + 4 * D + (D + 4 * F) * 4
    moe_block = attention + 4 * D + D * 4 + 8 * E + 2 * (2 * D + 4 * FE) * 4
    output = 4 * D + 2 * V * 4
    assert _estimate().activations == tokens * (dense_block + moe_block + output)
    full = _estimate(checkpointing="full").activations
    assert full == tokens * (2 * 4 * D + max(dense_block, moe_block) + output)
    selective_block = 8 * D + 4 * D + (D + 4 * F) * 4, 8 * D + 4 * D + D * 4 + 8 * E + 2 * 2 * D * 4
    assert _estimate(checkpointing="selective").activations == tokens * (sum(selective_block) + output)
    deeper = [_estimate("model.n_layers=4", checkpointing=mode).activations for mode in ("full", "selective", "none")]
    assert deeper[0] < deeper[1] < deeper[2]
    assert _estimate("train.micro_batch_size=4").activations == 2 * _estimate().activations


def test_expert_tensor_parallelism_splits_expert_weights_and_gathers_rows():
    est = _estimate("parallel.ep=2", "parallel.etp=2", world_size=4)
    assert est.rank_params == TOTAL - EXPERTS + EXPERTS // 4  # experts over ep x etp
    # Per routed copy (k = 2): etp = 2 gathered input rows, one output row, 4 * FE of intermediates
    # split over etp but computed for etp rows; the other terms do not change.
    base = _estimate("parallel.ep=2", world_size=4)
    assert est.activations - base.activations == 2 * 8 * 2 * D * 4  # tokens x k x one more row x fp32
    selective = [_estimate(*p, world_size=4, checkpointing="selective").activations
                 for p in (("parallel.ep=2", "parallel.etp=2"), ("parallel.ep=2",))]
    assert selective[0] - selective[1] == 2 * 8 * 2 * D * 4


def test_the_estimate_says_when_it_does_not_fit():
    est = estimate_memory(load_config(None, SMALL), 1, device_memory=1024.0)
    assert est.fits is False and "device" in est.describe()
    assert estimate_memory(load_config(None, SMALL), 1, device_memory=GIB).fits is True


def _documented_world_size(path: Path) -> int:
    match = re.search(r"--world-size (\d+)", path.read_text())
    return int(match.group(1)) if match else 1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("scale/*.yaml")),
                         ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_dry_runs_at_its_documented_world_size(path, capsys):
    world = _documented_world_size(path)
    code = main(["train", "--config", str(path), "--dry-run", "--world-size", str(world),
                 "--device-memory-gib", "80"])
    out = capsys.readouterr().out
    assert f"world {world} = " in out and "memory per rank" in out
    assert code == 0, f"{path.name} does not fit its documented mesh:\n{out}"


def test_a_30b_config_is_built_on_the_meta_device():
    cfg = load_config(str(CONFIGS / "scale" / "qwen3_30b_a3b.yaml"), [])
    est = estimate_memory(cfg, 32)
    assert 29e9 < est.total_params < 32e9  # no storage was allocated for 30B parameters


def test_world_size_needs_dry_run(capsys):
    assert main(["train", "--world-size", "8"]) == 2
    assert "use them with --dry-run" in capsys.readouterr().err


def test_the_guide_table_of_scale_configs_is_what_the_estimate_says():
    guide = (CONFIGS.parent / "docs" / "guide" / "large-models.md").read_text()
    rows = re.findall(r"\| `(\w+\.yaml)` \| ([\d.]+)B \(([\d.]+)B\) \| .*? \| ([\d.]+) GiB \|", guide)
    assert len(rows) == 5
    for name, total_b, active_b, total_gib in rows:
        path = CONFIGS / "scale" / name
        est = estimate_memory(load_config(str(path), []), _documented_world_size(path), 80 * GIB,
                              load_config(str(path), []).train.activation_checkpointing)
        assert round(est.total_params / 1e9, len(total_b.split(".")[1])) == float(total_b), name
        assert round(est.active_params / 1e9, len(active_b.split(".")[1])) == float(active_b), name
        assert round(est.total / GIB, 1) == float(total_gib), name


def test_fsdp_shards_everything_and_adds_two_gathered_blocks():
    est = _estimate("parallel.fsdp=true", "parallel.ep=2", world_size=4)  # dp 4, edp 2
    dense, experts = TOTAL - EXPERTS, EXPERTS // 2
    shards = dense / 4 + experts / 2
    dense_block = ATTENTION + NORMS + DENSE_MLP  # block 0, larger than block 1's 1888 on one rank
    assert dense_block > ATTENTION + NORMS + ROUTER + EXPERTS // 2
    assert est.params == pytest.approx(4 * shards + 2 * dense_block * 4)
    assert (est.gradients, est.optimizer) == (pytest.approx(4 * shards), pytest.approx(8 * shards))
