"""FLOPs per token against a hand count, peak table, MFU arithmetic, throughput meter."""

from __future__ import annotations

import pytest
import torch

from moe_dist.config import ModelConfig, MoEConfig, RouterConfig
from moe_dist.metrics import (DeviceMeans, FlopsBreakdown, ThroughputMeter, mfu, peak_tflops,
                              resolve_peak_tflops, training_flops_per_token)


def _tiny():
    model = ModelConfig(dim=8, n_layers=2, n_heads=2, ffn_dim=16, vocab_size=10)
    moe = MoEConfig(num_experts=4, every=2, expert_ffn_dim=8, num_shared_experts=1,
                    router=RouterConfig(top_k=2))
    return model, moe


def test_flops_of_tiny_model_match_hand_count():
    model, moe = _tiny()
    flops = training_flops_per_token(model, moe, seq_len=4)
    # Forward, per token (d=8, S=4). Block 0 dense, block 1 MoE (every=2).
    #   attention per block: projections 2*4*8*8 = 512, scores 2*2*8*(4+1)/2 = 80  -> 592, x2 blocks
    #   dense MLP block 0: 2*3*8*16 = 768; shared expert block 1: 1 * 2*3*8*8 = 384
    #   routed experts block 1: top_k 2 * 2*3*8*8 = 768; router 2*8*4 = 64; head 2*8*10 = 160
    # Training = 3 x forward.
    assert flops.attention == 3 * 2 * 592
    assert flops.dense == 3 * (768 + 384)
    assert flops.experts == 3 * 768
    assert flops.router == 3 * 64
    assert flops.head == 3 * 160
    assert flops.total == 9984
    # Same number the "6N + attention" way: active matmul parameters
    # 2*4*64 (attn) + 3*8*16 (dense) + 32 (router) + 2*3*8*8 (2 experts) + 3*8*8 (shared) + 80 (head).
    active_params = 512 + 384 + 32 + 384 + 192 + 80
    assert flops.total == 6 * active_params + 3 * 2 * (2 * 8 * (4 + 1))
    assert flops.as_dict()["total"] == flops.total


def test_attention_term_grows_with_seq_len_and_expert_count_does_not_matter():
    model, moe = _tiny()
    short, long = (training_flops_per_token(model, moe, s) for s in (4, 12))
    assert long.attention - short.attention == 3 * 2 * 2 * 2 * 8 * (12 - 4) / 2
    assert long.experts == short.experts
    more_experts = MoEConfig(num_experts=16, every=2, expert_ffn_dim=8, num_shared_experts=1,
                             router=RouterConfig(top_k=2))
    wide = training_flops_per_token(model, more_experts, 4)
    assert wide.experts == short.experts and wide.router == 4 * short.router


def test_vocab_override_and_errors():
    model, moe = _tiny()
    model.vocab_size = 0
    with pytest.raises(ValueError, match=r"model.vocab_size \(0\).*vocab_size="):
        training_flops_per_token(model, moe, 4)
    assert training_flops_per_token(model, moe, 4, vocab_size=10).total == 9984
    model.arch = "switchhead"
    with pytest.raises(NotImplementedError, match="model.arch='switchhead'.*flops_per_token"):
        training_flops_per_token(model, moe, 4, vocab_size=10)


def test_model_hook_takes_precedence():
    class Counted:
        def flops_per_token(self, seq_len: int) -> FlopsBreakdown:
            return FlopsBreakdown(dense=seq_len, attention=1, experts=2, router=3, head=4)

    model, moe = _tiny()
    model.arch = "switchhead"
    assert training_flops_per_token(model, moe, 5, model=Counted()).total == 15

    class Wrong:
        def flops_per_token(self, seq_len: int) -> float:
            return 1.0

    with pytest.raises(TypeError, match="Wrong.flops_per_token must return a FlopsBreakdown"):
        training_flops_per_token(model, moe, 5, model=Wrong())


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H20", 148.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA B200", 2250.0),
    ("Mystery Accelerator 9000", None), ("cpu", None),
])
def test_peak_table(name, expected):
    assert peak_tflops(name) == expected


def test_peak_of_cpu_device_and_override():
    assert peak_tflops(torch.device("cpu")) is None
    assert resolve_peak_tflops(100.0, "cpu") == 100.0
    assert resolve_peak_tflops(0.0, "NVIDIA A100-SXM4-40GB") == 312.0
    with pytest.raises(ValueError, match=r"log.peak_tflops \(-1.0\)"):
        resolve_peak_tflops(-1.0, "cpu")


def test_mfu_arithmetic():
    # 1e5 tok/s * 6e9 FLOP/tok = 6e14 FLOP/s over 8 x 989e12 = 7.912e15 FLOP/s.
    assert mfu(1e5, 6e9, 989.0, 8) == pytest.approx(6e14 / 7.912e15)
    assert mfu(1e5, 6e9, None, 8) is None
    assert mfu(1e5, 6e9, 0.0, 8) is None
    with pytest.raises(ValueError, match=r"num_devices \(0\)"):
        mfu(1.0, 1.0, 1.0, 0)


def test_throughput_meter_excludes_paused_time():
    ticks = iter([10.0, 11.0, 14.0, 15.0, 17.0])
    meter = ThroughputMeter("cpu", clock=lambda: next(ticks))
    meter.start()                       # t = 10
    meter.step(1000)
    meter.step(1000)
    with meter.paused():                # t = 11 .. 14: validation, not counted
        pass
    window = meter.measure()            # t = 15: 5 s elapsed - 3 s paused = 2 s
    assert (window.tokens_per_s, window.step_time_ms, window.steps) == (1000.0, 1000.0, 2)
    meter.step(500)
    window = meter.measure()            # t = 17: new window started at 15
    assert (window.tokens_per_s, window.step_time_ms) == (250.0, 2000.0)
    with pytest.raises(RuntimeError, match="before start"):
        ThroughputMeter().measure()


def test_throughput_meter_marked_windows_are_timed_where_they_were_marked():
    """Windows read late (the trainer reads one at the next logging step, or later): each is
    timed between its mark and the previous one, whenever it is measured, minus the time paused
    inside it; steps recorded after a mark belong to the next window."""
    ticks = iter([0.0, 4.0, 5.0, 8.0, 12.0])
    meter = ThroughputMeter("cpu", clock=lambda: next(ticks))
    meter.start()                             # t = 0
    meter.step(100)
    meter.step(100)
    first = meter.mark()                      # t = 4: window 1 = 2 steps
    with meter.paused():                      # t = 5 .. 8: validation, inside window 2
        pass
    meter.step(300)
    second = meter.mark()                     # t = 12: window 2 = 1 step, 8 s - 3 s paused
    one, two = meter.measure_mark(first), meter.measure_mark(second)  # both read later
    assert (one.steps, one.tokens, one.tokens_per_s, one.step_time_ms) == (2, 200, 50.0, 2000.0)
    assert (two.steps, two.tokens, two.tokens_per_s, two.seconds) == (1, 300, 60.0, 5.0)
    with pytest.raises(RuntimeError, match="before start"):
        ThroughputMeter().mark()


def test_device_means_pop_on_device_matches_pop():
    first, second = DeviceMeans(), DeviceMeans()
    for means in (first, second):
        means.add({"b": torch.tensor(2.0), "a": 1.0})
        means.add({"b": torch.tensor(4.0), "a": 3.0})
    keys, values = first.pop_on_device(torch.device("cpu"))
    assert keys == ["a", "b"] and values.dtype == torch.float32
    assert dict(zip(keys, values.tolist())) == second.pop() == {"a": 2.0, "b": 3.0}
    assert len(first) == 0 and first.pop_on_device(torch.device("cpu"))[1].numel() == 0


def test_device_means_average_over_the_window():
    means = DeviceMeans()
    for loss in (1.0, 2.0, 6.0):
        means.add({"train/loss": torch.tensor(loss), "train/lr": 0.5})
    assert means.pop() == {"train/loss": 3.0, "train/lr": 0.5}
    assert len(means) == 0 and means.pop() == {}


@pytest.mark.slow  # FlopCounterMode's first use initialises torch machinery for seconds
def test_matmul_flops_match_torch_flop_counter_on_the_real_model():
    """Everything but the attention scores is a plain matmul (aten.mm) in the model; torch's
    FlopCounterMode must see exactly our count of them over forward + backward. Block 0 is dense,
    block 1 is MoE with a shared expert."""
    from torch.utils.flop_counter import FlopCounterMode

    from moe_dist.models.transformer import Transformer

    torch.manual_seed(0)
    model_cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=48, vocab_size=40, max_seq_len=16)
    moe_cfg = MoEConfig(num_experts=4, every=2, expert_ffn_dim=16, num_shared_experts=1,
                        router=RouterConfig(top_k=2), grouped_gemm="loop")  # dropless by default
    model = Transformer(model_cfg, moe_cfg)
    batch, seq_len = 2, 16
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 40, (batch, seq_len))).logits.sum().backward()
    mm_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op) == "aten.mm")
    flops = training_flops_per_token(model_cfg, moe_cfg, seq_len)
    scores = 3 * model_cfg.n_layers * 2 * 2 * model_cfg.dim * (seq_len + 1) / 2
    assert mm_flops / (batch * seq_len) == flops.total - scores


def test_six_n_matches_parameters_of_the_real_model():
    """Without the attention-score term, training FLOPs are 6 x the matmul parameters a token
    passes through: all Linear weights, the router weights, and top_k of the E experts' weights."""
    from moe_dist.models.transformer import Transformer

    model_cfg = ModelConfig(dim=32, n_layers=3, n_heads=2, ffn_dim=48, vocab_size=40, max_seq_len=16)
    moe_cfg = MoEConfig(num_experts=4, every=2, expert_ffn_dim=16, num_shared_experts=2,
                        router=RouterConfig(top_k=2))
    model = Transformer(model_cfg, moe_cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    active_moe = 0
    for _, layer in model.moe_layers():
        per_expert = sum(p.numel() for p in layer.experts.parameters()) / moe_cfg.num_experts
        active_moe += moe_cfg.router.top_k * per_expert + layer.router.weight.numel()
    seq_len = 16
    flops = training_flops_per_token(model_cfg, moe_cfg, seq_len)
    scores = 3 * model_cfg.n_layers * 2 * model_cfg.dim * (seq_len + 1)
    assert flops.total - scores == 6 * (linear + active_moe)
