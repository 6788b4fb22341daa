"""Every feature under ``train.engine=deepspeed`` against the native engine, 2 gloo ranks (dp=2, ep=2).

For each feature, both engines' real trainers (``NativeTrainer``, ``DeepSpeedTrainer``) are built
from the same config on the same mesh and train the same steps on the bundled corpus (byte
tokenizer, 2 accumulation micro-batches per rank). Compared on every rank, engine against engine:

* every step's logged means (loss, lm and router losses, grad norm);
* the final module state: parameters (expert shards are the same slice on both) and persistent
  buffers (router biases, DynMoE active sets and records, PEER BatchNorm statistics);
* the routing metrics (capacity factors, active experts, thresholds);
* the final Adam moments of every parameter (DeepSpeed's are read back from its partitions).

One process start runs every feature in turn (``_RESULTS`` fixture); each feature is its own
test id, which docs/deepspeed.md's feature table names. The features DeepSpeed refuses are checked
in ``test_zero.py::test_unsupported_deepspeed_layouts_are_refused_up_front``.
"""

from __future__ import annotations

import time
import traceback

import pytest
import torch

from harness import run_distributed
from test_zero import skip_shm_build

BASE = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=64",
    "moe.num_experts=4", "moe.every=1", "moe.expert_ffn_dim=32",
    "data.seq_len=32", "data.max_documents=2",
    "train.global_batch_size=4", "train.micro_batch_size=1", "train.warmup_steps=1",
    "train.lr=1e-2", "train.grad_clip=0.5", "train.device=cpu", "train.eval_every=0",
    "parallel.ep=2", "zero.stage=2", "log.progress_bar=false", "log.tensorboard=false",
]
STEPS = 3
MOMENTS = ("exp_avg", "exp_avg_sq")
ROUTER = "moe.router"
CAPACITY = "moe.capacity"
DYNMOE = [f"{ROUTER}.type=top_any", f"{ROUTER}.top_k=4", f"{ROUTER}.adaptive.enabled=true",
          f"{ROUTER}.adaptive.initial_experts=2", f"{ROUTER}.adaptive.update_every=2",
          f"{ROUTER}.adaptive.record_steps=0"]

FEATURES: dict[str, list[str]] = {
    # parallelism and ZeRO
    "zero0_ep1": ["zero.stage=0", "parallel.ep=1"],
    "zero1": ["zero.stage=1"],
    "zero2": [],
    "offload": ["zero.offload_optimizer=true"],
    # routers
    "sigmoid_topk": [f"{ROUTER}.type=sigmoid_topk"],
    "top_p": [f"{ROUTER}.type=top_p", f"{ROUTER}.top_k=4", f"{ROUTER}.top_p=0.5"],
    "xmoe": [f"{ROUTER}.type=xmoe", f"{ROUTER}.top_k=4", f"{ROUTER}.xmoe_threshold=0.8"],
    "da_moe": [f"{ROUTER}.type=da_moe", f"{ROUTER}.top_k=3"],
    "top_any": [f"{ROUTER}.type=top_any", f"{ROUTER}.top_k=4"],
    "expert_choice": [f"{ROUTER}.type=expert_choice"],
    # capacity policies (dropless is every case above)
    "fixed": [f"{CAPACITY}.policy=fixed", f"{CAPACITY}.capacity_factor=1.0"],
    "dynamic": [f"{CAPACITY}.policy=dynamic", f"{CAPACITY}.capacity_factor=0.5"],
    "controller": [f"{CAPACITY}.policy=controller", f"{CAPACITY}.capacity_factor=0.75"],
    # routing state updated after the step
    "aux_free_bias": [f"{ROUTER}.bias_update_rate=0.01"],
    "dynmoe": DYNMOE,
    "dynmoe_zero0_ep1": DYNMOE + ["zero.stage=0", "parallel.ep=1"],
    # architectures
    "switchhead": ["model.arch=switchhead", "model.switchhead.switch_all=true", "model.switchhead.num_experts=3"],
    "peer": ["model.arch=peer", "model.peer.num_experts=64", "model.peer.heads=2", "model.peer.top_k=4",
             "model.peer.query_dim=8", "moe.every=2"],
    "mh_moe": ["model.arch=mh_moe", "model.mh_moe.heads=2", "model.mh_moe.match_moe=false"],
    "stratified": ["model.arch=stratified", "model.stratified.strata=[2,2]"],
}
STEPS_OF = {"dynmoe": 4, "dynmoe_zero0_ep1": 4}  # DynMoE decides after steps 2 and 4


def _config(name: str, engine: str, cache_dir: str):
    from moe_dist.config import load_config

    return load_config(None, BASE + FEATURES[name] + [f"train.engine={engine}", f"data.cache_dir={cache_dir}",
                                                      f"train.steps={STEPS_OF.get(name, STEPS)}"])


def _moments(module: torch.nn.Module, optimizer) -> dict[str, dict[str, object]]:
    """name -> {AdamW state key: full tensor}; collective under ZeRO (call on every rank): each
    rank's partition is placed in a zero tensor and the pieces are summed over the param's
    data-parallel group (the edp group for experts)."""
    import torch.distributed as dist

    from moe_dist.train.engines.deepspeed import partition_fragments

    out = {}
    for name, param in module.named_parameters():
        if hasattr(param, "_hp_mapping"):  # ZeRO-1/2
            full = {key: torch.zeros(param.numel()) for key in MOMENTS}
            found = partition_fragments(optimizer, param)
            if found is not None:
                here, _, state = found
                for key in MOMENTS:
                    full[key][here] = state[key]
            for key in MOMENTS:
                dist.all_reduce(full[key], group=param._dp_group)
            out[name] = {key: value.view_as(param).numpy() for key, value in full.items()}
        else:
            state = getattr(optimizer, "optimizer", optimizer).state.get(param, {})
            out[name] = {key: state[key].detach().clone().numpy() for key in MOMENTS if key in state}
    return out


def _train(name: str, engine: str, runtime, cache_dir: str, run_dir: str) -> dict:
    from moe_dist.metrics import DeviceMeans
    from moe_dist.moe.routing.state import routing_metrics

    cfg = _config(name, engine, cache_dir)
    if engine == "deepspeed":
        from moe_dist.train.engines.deepspeed import DeepSpeedTrainer as trainer_cls
    else:
        from moe_dist.train.engines.native import NativeTrainer as trainer_cls
    trainer = trainer_cls(cfg, run_dir, runtime)
    module = trainer.module if engine == "deepspeed" else trainer.model
    steps = []
    for _ in range(cfg.train.steps):
        means = DeviceMeans()
        trainer.train_step(means)
        steps.append(means.pop())
    record = {"steps": steps,
              "state": {k: v.detach().clone().numpy() for k, v in module.state_dict().items()},
              "routing": routing_metrics(module, trainer.plan.sum_over_token_ranks, reset=False)[0],
              "moments": _moments(module, trainer.optimizer),
              "agreements": sum(getattr(m.agree_stratum, "calls", 0) for m in module.modules()
                                if hasattr(m, "agree_stratum"))}
    if engine == "deepspeed":
        trainer.engine.destroy()
    return record


def run_features(rank: int, world_size: int, names: list[str], cache_dir: str, run_dir: str) -> dict:
    """Spawned-process entry: both engines for every feature, on one mesh per ep degree."""
    from moe_dist.config import validate
    from moe_dist.distributed.launch_env import LaunchEnv
    from moe_dist.distributed.mesh import build_mesh
    from moe_dist.train.runtime import Runtime

    skip_shm_build()
    env = LaunchEnv(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, node_rank=0,
                    master_addr="127.0.0.1", master_port=29500, launcher="torchrun")
    meshes, out = {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            cfg = _config(name, "deepspeed", cache_dir)
            validate(cfg, world_size)  # what build_runtime checks before any group
            ep = cfg.parallel.ep
            if ep not in meshes:  # DeepSpeed's registry keeps the first groups of each ep degree
                meshes[ep] = build_mesh(cfg.parallel, world_size, "cpu")
            runtime = Runtime(env, meshes[ep], torch.device("cpu"))
            out[name] = {engine: _train(name, engine, runtime, cache_dir, run_dir)
                         for engine in ("native", "deepspeed")}
        except Exception:  # noqa: BLE001 - reported per feature; a hang still fails the whole spawn
            out[name] = {"error": traceback.format_exc()}
        out[name]["seconds"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    base = tmp_path_factory.mktemp("zero_features")
    return run_distributed(run_features, 2, list(FEATURES), str(base / "cache"), str(base / "run"),
                           timeout=400, pg_timeout_s=60)


TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 on both engines; they differ only in summation order


@pytest.mark.parametrize("name", list(FEATURES))
def test_deepspeed_matches_native(results: list[dict], name: str) -> None:
    for rank, per_rank in enumerate(results):
        got = per_rank[name]
        assert "error" not in got, f"rank {rank}:\n{got.get('error')}"
        native, ds = got["native"], got["deepspeed"]
        where = f"{name} rank {rank}"
        for step, (want, have) in enumerate(zip(native["steps"], ds["steps"], strict=True)):
            assert set(want) == set(have), (where, step, sorted(want), sorted(have))
            for key in want:
                torch.testing.assert_close(have[key], want[key], **TOL, msg=lambda m: f"{where} step {step} {key}: {m}")
        assert set(native["state"]) == set(ds["state"]), where
        for key, want in native["state"].items():
            torch.testing.assert_close(torch.from_numpy(ds["state"][key]), torch.from_numpy(want), **TOL,
                                       msg=lambda m: f"{where} final {key}: {m}")
        assert set(native["routing"]) == set(ds["routing"]), where
        for key, want in native["routing"].items():
            torch.testing.assert_close(ds["routing"][key], want, **TOL, msg=lambda m: f"{where} routing {key}: {m}")
        for param, states in native["moments"].items():
            assert set(states) == set(MOMENTS), (where, param, sorted(states))
            for key, want in states.items():
                torch.testing.assert_close(torch.from_numpy(ds["moments"][param][key]), torch.from_numpy(want),
                                           **TOL, msg=lambda m: f"{where} {key} of {param}: {m}")
        assert ds["agreements"] == native["agreements"], where
    _check_feature_is_exercised(name, results)


def _check_feature_is_exercised(name: str, results: list[dict]) -> None:
    """The comparison above would pass vacuously if the feature never acted; show that it did."""
    ds = results[0][name]["deepspeed"]
    if name.startswith("dynmoe"):
        active = [ds["routing"][f"moe/layer_{i}/active_experts"] for i in range(2)]
        assert any(a > 2 for a in active), (name, active)  # some layer grew beyond its 2 initial slots
        assert any(key.endswith("adaptive_step") and int(v) == STEPS_OF[name] for key, v in ds["state"].items())
    if name == "aux_free_bias":
        biases = [v for key, v in ds["state"].items() if key.endswith("expert_bias")]
        assert biases and all(abs(b).max() > 0 for b in biases), biases
    if name == "controller":
        factors = [v for key, v in ds["routing"].items() if key.endswith("capacity_factor")]
        assert factors and all(f != 0.75 for f in factors), factors  # the controller moved
    if name == "stratified":
        assert ds["agreements"] > 0  # the pass agreement ran under DeepSpeed (parallelize_model)
