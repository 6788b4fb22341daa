"""moe-dist report: table values from hand-made metrics.jsonl fixtures, parameter and FLOP counts
against hand counts, and the power-law fit on data with known a and b."""

import csv
import json
import math

import numpy as np
import pytest

import moe_dist.metrics.sink  # noqa: F401  (torch and the models load at collection, not in a test)
import moe_dist.models.transformer  # noqa: F401
from moe_dist.config import ConfigError, load_config
from moe_dist.report import (RunSummary, count_model, default_out, find_run_dirs, fit_families, fit_power_law,
                             format_log_tick, format_markdown, format_table, load_run, plain_log_ticks,
                             summarize_metrics, swept_keys, table_rows, write_csv)

# d=32, 2 layers, byte vocabulary (256), 4 experts of width 32, top-2, seq_len 32, 4 sequences per step.
SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
         "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32", "moe.router.top_k=2", "data.seq_len=32",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2"]

# Hand-made metrics.jsonl: step 4 appears twice (a resumed run repeats it; the later line wins)
# and one imbalance is null (non-finite values are written as null).
RECORDS = [
    {"step": 2, "loss": 5.0, "tokens_per_s": 100.0, "moe/layer_0/imbalance": 1.5, "moe/layer_1/imbalance": 2.5,
     "moe/layer_0/drop_rate": 0.1, "moe/layer_1/drop_rate": 0.3, "moe/layer_0/realized_k": 2.0,
     "moe/layer_1/realized_k": 1.5, "val_loss": 5.5},
    {"step": 4, "loss": 4.2, "tokens_per_s": 999.0, "val_loss": 4.9, "moe/layer_0/imbalance": 9.0},
    {"step": 4, "loss": 4.0, "tokens_per_s": 300.0, "val_loss": 4.5, "moe/layer_0/imbalance": 1.0,
     "moe/layer_1/imbalance": 2.0, "moe/layer_0/drop_rate": 0.0, "moe/layer_1/drop_rate": 0.2,
     "moe/layer_0/realized_k": 1.8, "moe/layer_1/realized_k": 1.7},
    {"step": 6, "loss": 3.5, "tokens_per_s": 200.0, "moe/layer_0/imbalance": None, "moe/layer_1/imbalance": 3.0,
     "moe/layer_0/drop_rate": 0.4, "moe/layer_1/drop_rate": 0.0, "moe/layer_0/realized_k": 1.0,
     "moe/layer_1/realized_k": 2.0},
]


def make_run(path, overrides=(), records=RECORDS):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(load_config(None, [*SMALL, *overrides]).to_yaml())
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_metric_columns_equal_the_numbers_in_metrics_jsonl(tmp_path):
    run = load_run(make_run(tmp_path / "r"), count=False)
    assert run.final_step == 6
    assert run.final_loss == 3.5
    assert run.final_val_loss == 4.5  # last validation (step 4, the later line)
    assert run.val_curve == [(2, 5.5), (4, 4.5)]
    assert run.tokens_per_s == 200.0  # median of 100, 300, 200 (the replaced 999 is gone)
    assert run.mean_imbalance == pytest.approx((1.5 + 2.5 + 1.0 + 2.0 + 3.0) / 5)
    assert run.mean_drop_rate == pytest.approx((0.1 + 0.3 + 0.0 + 0.2 + 0.4 + 0.0) / 6)
    assert run.mean_realized_k == pytest.approx((2.0 + 1.5 + 1.8 + 1.7 + 1.0 + 2.0) / 6)


def test_table_and_csv_hold_the_run_numbers(tmp_path):
    runs = [load_run(make_run(tmp_path / "e4")), load_run(make_run(tmp_path / "e8", ["moe.num_experts=8"]))]
    assert swept_keys(runs) == ["moe.num_experts"]
    write_csv(table_rows(runs), tmp_path / "runs.csv")
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [row["run"] for row in rows] == ["e4", "e8"] and [row["moe.num_experts"] for row in rows] == ["4", "8"]
    for row, run in zip(rows, runs):
        for column in ("final_loss", "final_val_loss", "tokens_per_s", "mean_imbalance", "mean_drop_rate",
                       "train_flops"):
            assert float(row[column]) == getattr(run, column), column
        assert int(row["total_params"]) == run.total_params and int(row["active_params"]) == run.active_params
    assert float(rows[0]["final_loss"]) == 3.5 and float(rows[0]["tokens_per_s"]) == 200.0
    assert "| e8 | 8 |" in format_markdown(table_rows(runs), {})


def test_parameter_counts_match_a_hand_count():
    d, vocab, experts, width, layers = 32, 256, 4, 32, 2
    attention_and_norms = 4 * d * d + 2 * d
    expert_params = experts * 3 * d * width  # w13 (d x 2f) + w2 (f x d) per expert
    moe_block = attention_and_norms + experts * d + expert_params  # + router
    total = 2 * vocab * d + d + layers * moe_block  # embedding, LM head, final norm
    cfg = load_config(None, SMALL)
    got_total, active, k, _ = count_model(cfg, measured_k=None)
    assert got_total == total == 49568
    assert k == 2 and active == total - layers * expert_params * (experts - 2) // experts
    # Variable-k routers use the measured realised k; expert choice its capacity factor.
    _, active_top_p, k_top_p, _ = count_model(load_config(None, [*SMALL, "moe.router.type=top_p"]), 1.5)
    assert k_top_p == 1.5 and active_top_p == total - round(layers * expert_params * (1 - 1.5 / experts))
    _, active_ec, k_ec, _ = count_model(load_config(None, [*SMALL, "moe.router.type=expert_choice",
                                                           "moe.router.expert_choice_capacity=1.0"]), None)
    assert k_ec == 1.0 and active_ec == total - layers * expert_params * 3 // 4
    # moe.every=2: block 0 is a dense SwiGLU of width 64.
    total_every2, _, _, _ = count_model(load_config(None, [*SMALL, "moe.every=2"]), None)
    assert total_every2 == 2 * vocab * d + d + moe_block + attention_and_norms + 3 * d * 64


def test_training_flops_are_flops_per_token_times_tokens(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    d, seq = 32, 32
    per_layer = 2 * 4 * d * d + 2 * 2 * d * (seq + 1) / 2 + 2 * d * 4 + 2 * (2 * 3 * d * 32)
    per_token = 3 * (2 * per_layer + 2 * d * 256)
    assert run.flops_per_token == per_token == 186240
    assert run.train_flops == per_token * 4 * seq * 6


def test_power_law_fit_recovers_known_a_and_b():
    compute = [1e9, 3e9, 1e10, 5e10, 2e11]
    fit = fit_power_law(compute, [3.5 * c ** -0.07 for c in compute])
    assert fit.a == pytest.approx(3.5, rel=1e-9) and fit.b == pytest.approx(-0.07, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0) and fit.points == 5
    rng = np.random.default_rng(0)
    noisy_c = np.logspace(9, 12, 40)
    noisy = 12.0 * noisy_c ** -0.15 * np.exp(rng.normal(0, 0.01, 40))
    rough = fit_power_law(list(noisy_c), list(noisy))
    assert rough.b == pytest.approx(-0.15, abs=0.005) and rough.a == pytest.approx(12.0, rel=0.15)
    assert 0.9 < rough.r2 < 1.0
    with pytest.raises(ValueError, match="two distinct compute values"):
        fit_power_law([1e9, 1e9], [2.0, 1.9])


def _summary(name, router, curve, flops_per_token=1e6):
    return RunSummary(name=name, path=None, config={"moe.router.type": router}, final_step=curve[-1][0],
                      final_loss=None, final_val_loss=curve[-1][1], tokens_per_s=None, mean_imbalance=None,
                      mean_drop_rate=None, mean_realized_k=None, val_curve=curve, flops_per_token=flops_per_token,
                      tokens_per_step=100, warmup_steps=10)


def test_families_pool_runs_and_skip_warmup_points():
    law = lambda step: 50.0 * (1e8 * step) ** -0.1  # C = 1e6 FLOPs/token * 100 tokens * step
    a = _summary("a", "xmoe", [(5, 99.0), (10, 99.0), (20, law(20)), (40, law(40))])
    b = _summary("b", "xmoe", [(30, law(30)), (80, law(80))])
    c = _summary("c", "top_p", [(20, 3.0)])
    fits = fit_families([a, b, c], ["moe.router.type"])
    assert fits["type=xmoe"].points == 4  # steps 5 and 10 are warm-up (<= 10)
    assert fits["type=xmoe"].a == pytest.approx(50.0) and fits["type=xmoe"].b == pytest.approx(-0.1)
    assert fits["type=top_p"] == ("only one validation after warm-up (step 20; train.warmup_steps=10); a power law "
                                  "needs two or more at different compute: lower train.eval_every or train longer")
    assert set(fit_families([a, b], [])) == {"a", "b"}  # default: one family per run
    with pytest.raises(ConfigError, match="--family key 'moe.nope'"):
        fit_families([a], ["moe.nope"])


def test_run_discovery_expands_sweep_directories_in_natural_order(tmp_path):
    for name in ("num_experts=16", "num_experts=4", "num_experts=32"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "metrics.jsonl").write_text("")
    (tmp_path / "sweep" / "logs").mkdir()
    assert [p.name for p in find_run_dirs([tmp_path / "sweep"])] == ["num_experts=4", "num_experts=16",
                                                                     "num_experts=32"]
    with pytest.raises(ConfigError, match="neither a run directory"):
        find_run_dirs([tmp_path / "sweep" / "logs"])
    with pytest.raises(ConfigError, match="holds no records yet"):
        load_run(make_run(tmp_path / "empty", records=[]))
    assert math.isclose(summarize_metrics({})["final_step"], 0)


def test_a_family_without_a_fit_says_why():
    no_validation = _summary("a", "xmoe", [(40, 3.0)])
    no_validation.val_curve = []
    assert fit_families([no_validation], [])["a"].startswith("no validation loss was logged (train.eval_every=0?)")
    in_warmup = _summary("b", "xmoe", [(5, 4.0), (10, 3.9)])
    assert fit_families([in_warmup], [])["b"] == (
        "every validation (step 5, 10) falls within the warm-up (train.warmup_steps=10), which the fit leaves "
        "out; train longer or lower train.eval_every")
    unknown = _summary("c", "xmoe", [(20, 3.0), (40, 2.9)], flops_per_token=None)
    assert "training FLOPs are unknown" in fit_families([unknown], [])["c"]
    text = format_markdown([], {"b": fit_families([in_warmup], [])["b"]})
    assert "- b: no fit (every validation (step 5, 10) falls within the warm-up" in text


def test_single_run_reports_of_one_parent_do_not_share_a_directory(tmp_path):
    first, second = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert default_out([str(first)]) == first / "report"
    assert default_out([str(second)]) == second / "report"
    assert default_out([str(tmp_path / "sweep")]) == tmp_path / "sweep" / "report"
    assert default_out([str(first), str(second)]) == tmp_path / "runs" / "report-a+b"


def test_column_headers_keep_their_section(tmp_path):
    rows = [{"run": "x", "log.every": 5, "train.steps": 10, "moe.router.top_k": 2, "model.peer.top_k": 8,
             "final_loss": 3.0, "path": "p"}]
    header = format_table(rows).splitlines()[0].split()
    assert header == ["run", "log.every", "train.steps", "router.top_k", "peer.top_k", "final_loss"]
    assert "| run | log.every | train.steps | router.top_k | peer.top_k | final_loss |" in format_markdown(rows, {})


def test_log_axis_ticks_read_as_plain_numbers():
    assert [format_log_tick(v) for v in (3.1, 3.0, 0.05, 2000.0)] == ["3.1", "3", "0.05", "2000"]
    assert format_log_tick(1e12) == "$\\mathdefault{10^{12}}$"
    assert format_log_tick(3e12) == "$\\mathdefault{3\\times10^{12}}$"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1e12, 3e12], [3.6, 2.9])  # a loss range within one decade: matplotlib labels minor ticks
    ax.set(xscale="log", yscale="log")
    plain_log_ticks(ax.yaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()
              if t.get_text() and ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1]]
    plt.close(fig)
    assert labels and all("10^" not in label and "times" not in label for label in labels), labels
    assert "3" in labels
