#!/usr/bin/env bash
# One batched GPU run: install carried wheels, check correctness, run every benchmark, print a
# summary table last. Run from the repository root on the GPU machine:
#
#   bash benchmarks/run_gpu.sh [stages...]
#     stages: tests syncs layer dispatch train train_compile layer_compile profile
#             train_compile_graphs logging train_profile train_reference train_autotune largest
#             train_compile_fused
#     (default: all but train_reference, train_autotune, largest and train_compile_fused, in that order)
#
# Expected durations on one H100 (each stage's timeout is in the case below): tests ~1-2 min, layer ~1.5 min
# (three shapes), train_compile ~2 min, train_compile_graphs ~2 min, logging ~1 min,
# train_profile ~1.5 min (Inductor's on-disk cache makes a second compile of the same model
# faster), train_autotune several minutes (GEMM autotuning), largest ~5-8 min (issue 15 section 6:
# the 8.43B MoE of configs/scale/moe_8b_one_gpu.yaml with train.offload_optimizer; building the fp32
# model on the host takes a minute or two, each optimizer step ~40 s; needs >= 110 GiB of host RAM).
#
# Results go to $OUT (default /tmp/moe_dist_gpu): results.jsonl (one JSON line per result),
# *.log, profile.txt, summary.md. Wheels in .whl/ (megatron-core, deepspeed and their small
# dependencies; see docs/performance.md) are installed with --no-deps into /tmp/site.
set -u
OUT=${OUT:-/tmp/moe_dist_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${*:-tests syncs layer dispatch train train_compile layer_compile profile train_compile_graphs logging train_profile}
# Optional narrowing for short runs, e.g. TESTS=tests/gpu/test_cross_entropy_gpu.py
# LAYER_ARGS="--shapes mixtral" TRAIN_ARGS="--models moe".
# COMPILE_MODE: torch.compile mode of train_compile, logging and train_profile (default,
# reduce-overhead = CUDA graphs, max-autotune-no-cudagraphs).
TESTS=${TESTS:-tests/gpu}
LAYER_ARGS=${LAYER_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
# LARGEST_ARGS: flags of benchmarks/largest_model.py, e.g. "--micro-batch 4 --accum 128" or
# "--checkpointing selective" (default: the 8.43B shape, micro-batch 2 x 256, no recompute).
LARGEST_ARGS=${LARGEST_ARGS:-}
COMPILE_MODE=${COMPILE_MODE:-default}
START=$(date +%s)
stamp() { echo "[run_gpu +$(( $(date +%s) - START ))s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
stamp "wheels installed"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

run() {  # run <stage> <timeout_s> <command...>: JSON lines to results.jsonl, the rest to <stage>.log
  local stage=$1 limit=$2; shift 2
  stamp "start $stage"
  timeout "$limit" "$@" 2> >(tee -a "$OUT/$stage.log" >&2) | tee -a "$OUT/results.jsonl"
  stamp "end $stage (rc ${PIPESTATUS[0]})"
}

for stage in $STAGES; do
  case $stage in
    tests)
      stamp "start tests"
      timeout 300 python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log" | tail -5
      stamp "end tests" ;;
    syncs)  # host syncs per router x capacity policy, one GPU and a fake 4-rank ep group
      stamp "start syncs"
      timeout 240 python3 tests/gpu/test_host_syncs_gpu.py 2>&1 | tee "$OUT/syncs.md"
      stamp "end syncs" ;;
    layer) run layer 240 python3 -m benchmarks.moe_layer $LAYER_ARGS ;;
    layer_compile) run layer_compile 200 python3 -m benchmarks.moe_layer --systems moe_dist_compiled ;;
    dispatch) run dispatch 120 python3 -m benchmarks.dispatch ;;
    profile)
      stamp "start profile"
      timeout 90 python3 -m benchmarks.profile_layer > "$OUT/profile.txt" 2>>"$OUT/profile.log"
      stamp "end profile" ;;
    train) run train 100 python3 -m benchmarks.train_step $TRAIN_ARGS ;;
    train_compile) run train_compile 180 python3 -m benchmarks.train_step --compile-mode "$COMPILE_MODE" $TRAIN_ARGS ;;
    train_compile_fused)  # the compiled MoE step with moe.grouped_gemm=triton_fused (pairs with train_compile's dense row)
      run train_compile_fused 180 python3 -m benchmarks.train_step --compile-mode "$COMPILE_MODE" --models moe \
        --grouped-gemm triton_fused $TRAIN_ARGS ;;
    train_compile_graphs)  # CUDA graphs of the compiled forward and backward
      run train_compile_graphs 240 python3 -m benchmarks.train_step --compile-mode reduce-overhead $TRAIN_ARGS ;;
    train_autotune) run train_autotune 540 python3 -m benchmarks.train_step --compile-mode max-autotune-no-cudagraphs $TRAIN_ARGS ;;
    logging)  # the 1B MoE step at log.every=1 (TensorBoard + metrics.jsonl) against logging off
      run logging 180 python3 -m benchmarks.logging_cost --compile-mode "$COMPILE_MODE" ;;
    train_profile)  # kernel categories of the compiled MoE and dense steps (text table in train_profile.log)
      run train_profile 240 python3 -m benchmarks.profile_step --compile-mode "$COMPILE_MODE" ;;
    train_reference) run train_reference 120 python3 -m benchmarks.train_step --reference --models moe ;;
    largest) run largest 590 python3 -m benchmarks.largest_model $LARGEST_ARGS ;;
    *) echo "unknown stage $stage" ;;
  esac
done

python3 -m benchmarks.summarize "$OUT/results.jsonl" | tee "$OUT/summary.md"
stamp "done"
