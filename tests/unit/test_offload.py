"""The native engine's optimizer offload (train.offload_optimizer, moe_dist/train/offload.py):
the same update as the on-device AdamW, checkpoints that resume bit-identically, its config
errors and its memory estimate."""

from __future__ import annotations

import pytest
import torch

from moe_dist.config import ConfigError, load_config, validate
from moe_dist.distributed.launch_env import LaunchEnv
from moe_dist.models.activation_checkpointing import apply_activation_checkpointing
from moe_dist.models.compile import compile_blocks
from moe_dist.models.registry import build_model
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.engines.native import NativeTrainer
from moe_dist.train.memory import estimate_memory
from moe_dist.train.offload import OffloadedAdamW, OffloadPlan, _plan_chunks
from moe_dist.train.optim import build_optimizer, build_scheduler
from moe_dist.train.plan import LocalPlan
from moe_dist.train.runtime import build_runtime

SMALL = ["model.dim=16", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=32", "model.vocab_size=64",
         "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=8", "moe.router.top_k=2",
         "data.seq_len=8", "train.micro_batch_size=2", "train.global_batch_size=6", "train.dtype=fp32",
         "train.grad_clip=0.05", "train.lr=1e-2", "train.warmup_steps=2", "train.steps=6"]
ACCUM = 3


def _build(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.moe)


def _train(cfg, offload: bool, clip: bool = True, steps: int = 6, checkpointing: str = "none",
           compiled: bool = False, accum: int = ACCUM):
    """``steps`` optimizer steps of ``accum`` micro-batches each, as the native trainer runs them
    (compile, recompute, then the optimizer; zero_grad, backward of loss / accum, clip, step,
    scheduler). Returns the model, the optimizer and the grad norms."""
    model = _build(cfg)
    if compiled:
        compile_blocks(model)
    apply_activation_checkpointing(model, checkpointing)
    if offload:  # several chunks per step: the chunked host step is what runs
        optimizer = OffloadedAdamW(model, cfg.train, torch.device("cpu"), torch.float32, chunk_numel=1000)
        plan = OffloadPlan(model, optimizer)
        assert len(optimizer.chunks) >= 4
    else:
        optimizer, plan = build_optimizer(model, cfg.train), LocalPlan(model)
    scheduler = build_scheduler(optimizer, cfg.train)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 9), generator=generator) for _ in range(steps * accum)]
    norms = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            rows = batches[step * accum + micro]
            out = model(rows[:, :-1])
            loss = plan.cross_entropy(out.logits, rows[:, 1:]) + sum(out.losses.values())
            (loss / accum).backward()
        measured = plan.grad_norm()  # what the trainer reads when the optimizer clips in its step
        norms.append(plan.clip_grad_norm_(cfg.train.grad_clip if clip else float("inf")))
        torch.testing.assert_close(measured, norms[-1])
        optimizer.step()
        scheduler.step()
    return model, optimizer, torch.stack(norms)


@pytest.mark.parametrize("checkpointing", ["selective", "full"])
def test_offload_under_activation_checkpointing(checkpointing):
    """Recompute runs backward through the checkpointed blocks again; every parameter's gradient
    still reaches the fp32 buffer once per micro-batch (the same update as without either)."""
    cfg = load_config(None, SMALL)
    reference, _, ref_norms = _train(cfg, offload=False, steps=3)
    model, _, norms = _train(cfg, offload=True, steps=3, checkpointing=checkpointing)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)  # clipping hides a gradient's scale
    ref = _params(reference)
    for name, value in _params(model).items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-6, msg=name)


def test_offload_with_compiled_blocks():
    """train.compile with train.offload_optimizer: the blocks' forwards are compiled, the offload's
    post-accumulate-grad hooks stay on the parameters outside the compiled region and still fill
    the fp32 buffer (the parameters' own .grad freed) on every micro-batch, so 3 steps of 2
    micro-batches give the eager blocks' parameters to Inductor's rounding."""
    from torch._dynamo.utils import counters

    cfg = load_config(None, SMALL)
    eager, _, eager_norms = _train(cfg, offload=True, steps=3, accum=2)
    torch._dynamo.reset()
    counters.clear()
    model, optimizer, norms = _train(cfg, offload=True, steps=3, accum=2, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    assert all(p.grad is None for p in model.parameters())  # the hooks freed every .grad ...
    for param, offset in zip(optimizer.compute_params, optimizer.offsets):  # ... after adding it here
        assert optimizer.main_grads[offset:offset + param.numel()].abs().sum() > 0, tuple(param.shape)
    torch.testing.assert_close(norms, eager_norms, rtol=1e-5, atol=0)
    ref, got, initial = _params(eager), _params(model), _params(_build(cfg))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert min((initial[n] - got[n]).abs().max().item() for n in got) > 1e-3  # every parameter was stepped


def _named_masters(model, optimizer) -> dict[str, torch.Tensor]:
    master_of = {id(c): m for c, m in zip(optimizer.compute_params, optimizer.masters)}
    return {name: master_of[id(p)] for name, p in model.named_parameters()}


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_offloaded_adamw_gives_the_on_device_update():
    """Accumulation over 3 micro-batches, clipping that engages on every step, warm-up and
    cosine: the offloaded masters (and the device copies) equal the plain AdamW run's parameters
    to float rounding (fused vs single-tensor kernel, one flat norm vs per-parameter norms), while
    the run without clipping, which the check must tell apart, is far away."""
    cfg = load_config(None, SMALL)
    reference, _, ref_norms = _train(cfg, offload=False)
    model, optimizer, norms = _train(cfg, offload=True)
    unclipped, _, _ = _train(cfg, offload=False, clip=False)
    ref = _params(reference)
    got = _params(model)
    assert set(got) == set(ref)
    assert (ref_norms > 10 * cfg.train.grad_clip).all()  # clipping engaged on every step
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
    for name, master in _named_masters(model, optimizer).items():  # the device copy is the master (fp32 here)
        assert torch.equal(master.detach(), got[name]), name
    initial = _params(_build(cfg))
    assert max((initial[n] - ref[n]).abs().max().item() for n in ref) > 1e-2  # training moved the weights
    assert max((_params(unclipped)[n] - ref[n]).abs().max().item() for n in ref) > 1e-3  # a wrong rule fails


def test_gradients_accumulate_in_fp32_and_leave_no_param_grad():
    """The post-accumulate hook adds each micro-batch's gradient into the fp32 buffer and frees
    the parameter's: with bf16 device copies the buffer holds the fp32 sum."""
    cfg = load_config(None, SMALL)
    model = _build(cfg)
    optimizer = OffloadedAdamW(model, cfg.train, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in optimizer.masters)
    base = optimizer.flat_params.data_ptr()
    assert all((p.data_ptr() - base) % 128 == 0 for p in model.parameters())  # aligned for grouped GEMMs
    rows = torch.randint(0, 64, (2, 9))
    assert model.tok_embeddings(rows).dtype == torch.float32  # the residual stream stays fp32
    for _ in range(2):
        with torch.autocast("cpu", torch.bfloat16):  # as the trainer runs a bf16 model
            out = model(rows[:, :-1])
        out.logits.float().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.main_grads.dtype == torch.float32 and optimizer.main_grads.abs().sum() > 0
    optimizer.zero_grad()
    assert optimizer.main_grads.abs().sum() == 0


def test_chunks_hold_whole_parameters_and_cover_everything():
    chunks = _plan_chunks([5, 3, 10, 2, 2, 7], chunk_numel=8)
    assert [(c.start, c.end, c.members) for c in chunks] == [(0, 8, (0, 1)), (8, 18, (2,)), (18, 22, (3, 4)),
                                                             (22, 29, (5,))]


def _trainer(cfg, run_dir):
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                    master_port=0, launcher="single")
    return NativeTrainer(cfg, run_dir, build_runtime(cfg, env))


TRAINER = ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=32", "model.max_seq_len=32",
           "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=16", "data.seq_len=16", "data.max_documents=2",
           "train.global_batch_size=6", "train.micro_batch_size=2", "train.warmup_steps=1", "train.device=cpu",
           "train.eval_every=0", "log.progress_bar=false", "log.tensorboard=false", "log.every=1",
           "train.grad_clip=0.1", "train.offload_optimizer=true"]


def _state(trainer):
    optimizer = trainer.optimizer
    return ([m.detach().clone() for m in optimizer.masters],
            [{k: v.clone() for k, v in optimizer.state[m].items()} for m in optimizer.masters])


def test_checkpoint_resume_continues_bit_identically(tmp_path):
    """bf16 device copies (autocast on CPU): 4 steps in one go, and a run stopped at step 2 then
    resumed to 4 give the same fp32 masters and moments bit for bit. The checkpoint must hold the
    fp32 masters: resuming from the bf16 copies would round them. It is the on-device AdamW's
    format: the non-offloaded trainer resumes from it too."""
    bf16 = [*TRAINER, "train.dtype=bf16", "log.every=2", "train.steps=4"]
    straight = _trainer(load_config(None, bf16), tmp_path / "a")
    straight.fit()
    assert all(p.dtype == torch.bfloat16 for p in straight.model.parameters())
    stopped = _trainer(load_config(None, bf16), tmp_path / "b")
    stopped._stop_requested = True  # as a preemption signal: checkpoint at the next logging step, stop
    assert stopped.fit().preempted and stopped.step == 2
    resumed = _trainer(load_config(None, bf16), tmp_path / "b")
    resumed.maybe_resume()
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4
    expected, got = _state(straight), _state(resumed)
    for a, b in zip(expected[0], got[0]):
        assert torch.equal(a, b)
    for a, b in zip(expected[1], got[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(m, m.bfloat16().float()) for m in expected[0])  # masters are not the bf16 copies
    for compute, master in zip(resumed.optimizer.compute_params, resumed.optimizer.masters):
        assert torch.equal(compute.detach(), master.detach().bfloat16())

    on_device = _trainer(load_config(None, [*bf16, "train.offload_optimizer=false",
                                            f"checkpoint.resume={ckpt.latest_checkpoint(tmp_path / 'a')}"]),
                         tmp_path / "c")
    on_device.maybe_resume()
    assert on_device.step == 4
    masters = _named_masters(straight.model, straight.optimizer)
    for name, param in on_device.model.named_parameters():
        assert torch.equal(param.detach(), masters[name]), name
        moments = on_device.optimizer.state[param]
        assert moments["exp_avg"].abs().sum() > 0


def test_config_errors_name_the_key_and_the_fix():
    small = [*SMALL, "train.global_batch_size=8"]
    with pytest.raises(ConfigError, match=r"train.offload_optimizer=true with train.engine=deepspeed.*"
                                          r"zero.offload_optimizer=true"):
        validate(load_config(None, [*small, "train.offload_optimizer=true", "train.engine=deepspeed",
                                    "zero.stage=2"]), 2)
    with pytest.raises(ConfigError, match=r"train.offload_optimizer=true with a world of 2 processes.*one "
                                          r"process.*zero.offload_optimizer=true"):
        validate(load_config(None, [*small, "train.offload_optimizer=true"]), 2)
    with pytest.raises(ConfigError, match=r"moe.router.adaptive.enabled.*train.offload_optimizer=false"):
        validate(load_config(None, [*small, "train.offload_optimizer=true", "moe.router.type=top_any",
                                    "moe.router.adaptive.enabled=true"]), 1)
    with pytest.raises(ConfigError, match=r"train.optimizer_impl \('fused'\) with train.offload_optimizer=true.*"
                                          r"train.optimizer_impl=auto"):
        validate(load_config(None, [*small, "train.offload_optimizer=true", "train.optimizer_impl=fused"]), 1)
    validate(load_config(None, [*small, "train.offload_optimizer=true"]), 1)


def test_the_estimate_moves_master_weights_and_moments_to_the_host():
    """bf16 on the device: 2-byte weights, 4-byte fp32 gradient buffer, no optimizer state; the
    host holds 12 bytes per parameter (fp32 master + two moments)."""
    base = estimate_memory(load_config(None, [*SMALL, "train.dtype=bf16"]), 1)
    est = estimate_memory(load_config(None, [*SMALL, "train.dtype=bf16", "train.offload_optimizer=true"]), 1)
    n = est.total_params
    assert (est.params, est.gradients, est.optimizer, est.optimizer_on_host) == (2 * n, 4 * n, 0, 12 * n)
    assert est.activations == base.activations and base.params + base.gradients + base.optimizer == 16 * n
    assert "on the host" in est.describe()


def test_the_one_gpu_config_is_what_its_header_says():
    """configs/scale/moe_8b_one_gpu.yaml: >= 8B parameters with offload, ~47 GiB of weights and
    gradient buffer on the GPU, ~94 GiB on the host, 256 micro-batches of 2 (~1M tokens) per step."""
    from pathlib import Path

    from moe_dist.config import grad_accum_steps
    from moe_dist.train.memory import GIB

    path = Path(__file__).resolve().parents[2] / "configs" / "scale" / "moe_8b_one_gpu.yaml"
    cfg = load_config(str(path), [])
    est = estimate_memory(cfg, 1, 80 * GIB, cfg.train.activation_checkpointing)
    assert cfg.train.offload_optimizer and est.total_params >= 8e9 and est.fits
    assert round((est.params + est.gradients) / GIB) == 47 and round(est.optimizer_on_host / GIB) == 94
    assert grad_accum_steps(cfg, 1) == 256 and cfg.train.global_batch_size * cfg.data.seq_len == 1 << 20
