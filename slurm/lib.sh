# shellcheck shell=bash
# Helpers shared by slurm/*.sbatch; sourced, not run. Everything here runs in the batch
# shell on the first node of the allocation.
#
# Preemption and time limits, end to end:
#   1. `#SBATCH --signal=B:USR1@300` makes Slurm send SIGUSR1 to this batch shell (only) 300 s
#      before the time limit. Without `B:` it would go to the job steps and the batch shell
#      would never learn that it has to requeue.
#   2. moe_run_step runs the step (`srun ...`) in the background and waits; bash runs the trap
#      as soon as the signal arrives, which kills `srun` with SIGUSR1. srun forwards SIGUSR1 to
#      its tasks and slurmstepd delivers it to every process of each task (proctrack signals the
#      whole process tree), so torchrun/deepspeed workers receive it directly, wherever they sit.
#      Never forward SIGTERM to srun: srun treats it as "cancel the step" and kills the tasks.
#   3. Launchers in between must survive SIGUSR1: torchrun is told to handle and forward it
#      (PET_SIGNALS_TO_HANDLE below, then it waits PET_SHUTDOWN_TIMEOUT s for its workers); the
#      deepspeed launcher is started with SIGUSR1 ignored (see deepspeed.sbatch).
#   4. The trainer saves a checkpoint at the next step boundary and exits with code 124.
#   5. When the step has ended, moe_run_step calls `scontrol requeue $SLURM_JOB_ID` if a
#      signal arrived or a task exited with 124. The requeued job gets the same job id, hence
#      the same run directory, and checkpoint.resume=auto continues from the newest checkpoint.
#   SIGTERM to the batch shell (scancel, or a preemption with GraceTime) takes the same path.

MOE_PREEMPT_EXIT=124   # the trainer's "checkpointed because of a signal; requeue me" code

moe_say() { echo "[moe-dist $(date +%H:%M:%S)] $*"; }
moe_fail() { echo "[moe-dist] ERROR: $*" >&2; exit 2; }

# moe_job_init DEFAULT_RUN_SUBDIR ARGS...
# Finds the repository, activates its Python environment, checks the training arguments and
# sets RUN_DIR (created) and MOE_TRAIN_ARGS (array: --run-dir RUN_DIR ARGS...).
moe_job_init() {
    local subdir=$1
    shift
    [ -n "${SLURM_JOB_ID:-}" ] || moe_fail "not inside a Slurm job; submit with: sbatch $0"
    # sbatch runs a copy of the script from the spool directory, so locate the checkout
    # through the submit directory unless MOE_DIST_ROOT says otherwise.
    MOE_DIST_ROOT=${MOE_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    [ -f "$MOE_DIST_ROOT/slurm/lib.sh" ] ||
        moe_fail "MOE_DIST_ROOT=$MOE_DIST_ROOT is not a moe_dist checkout; submit from the repository root or export MOE_DIST_ROOT"
    cd "$MOE_DIST_ROOT"
    if [ -n "${MOE_DIST_VENV:-}" ]; then
        # shellcheck disable=SC1091
        . "$MOE_DIST_VENV/bin/activate" || moe_fail "cannot activate MOE_DIST_VENV=$MOE_DIST_VENV"
    elif [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
        # shellcheck disable=SC1091
        . .venv/bin/activate
    fi
    PYTHON=${PYTHON:-python3}
    local arg
    for arg in "$@"; do
        case "$arg" in
            --run-dir|--run-dir=*)
                moe_fail "pass the run directory as RUN_DIR=... (environment), not --run-dir: the job's logs and requeue logic use it too" ;;
        esac
    done
    RUN_DIR=${RUN_DIR:-$MOE_DIST_ROOT/runs/$subdir}
    mkdir -p "$RUN_DIR" || moe_fail "cannot create RUN_DIR=$RUN_DIR"
    MOE_TRAIN_ARGS=(--run-dir "$RUN_DIR" "$@")
    export RUN_DIR OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # torchrun >= 2.9 reads its flags from PET_* variables too; older versions ignore them.
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
    export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-270}
    MOE_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [ -n "$MOE_MASTER_ADDR" ] || moe_fail "scontrol show hostnames '$SLURM_JOB_NODELIST' printed nothing"
    # the same port moe_dist derives from the job id (distributed/launch_env.slurm_port)
    MOE_MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    moe_say "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
            "${SLURM_JOB_NUM_NODES:-?} node(s) $SLURM_JOB_NODELIST, first node $MOE_MASTER_ADDR," \
            "run dir $RUN_DIR"
}

# moe_procs_per_node: NPROC if set, else the GPUs Slurm gave this node, else 1 (CPU).
moe_procs_per_node() {
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    if [ -n "${NPROC:-}" ]; then
        echo "$NPROC"
    elif [[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -gt 0 ]; then
        echo "$gpus"
    else
        echo 1
    fi
}

# moe_srun_flags: flags every step needs. Since Slurm 22.05 srun no longer inherits
# --cpus-per-task from the batch allocation, so pass it on.
moe_srun_flags() {
    MOE_SRUN=(srun --export=ALL)
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then MOE_SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
}

_moe_signal=""
_moe_step_pid=""
_moe_on_signal() {
    _moe_signal=$1
    moe_say "batch shell got SIG$1: asking the training step to checkpoint and stop"
    if [ -n "$_moe_step_pid" ]; then kill -USR1 "$_moe_step_pid" 2>/dev/null || true; fi
}

# Trap from the moment this file is sourced: a signal that arrives before the step starts
# must not kill the batch shell (the default action), it must requeue the job.
trap '_moe_on_signal USR1' USR1
trap '_moe_on_signal TERM' TERM

# moe_run_step COMMAND...: run one job step, forward preemption signals to it, and requeue
# the job when the step stopped because of one. Exits the batch script with the step's code.
moe_run_step() {
    if [ -n "$_moe_signal" ]; then
        moe_say "SIG$_moe_signal arrived before the step started"
        moe_requeue
    fi
    moe_say "step: $*"
    "$@" &
    _moe_step_pid=$!
    local rc=0
    wait "$_moe_step_pid" || rc=$?
    # a trapped signal interrupts `wait`; keep waiting until the step has really ended
    while kill -0 "$_moe_step_pid" 2>/dev/null; do wait "$_moe_step_pid" || true; done
    rc=0
    wait "$_moe_step_pid" || rc=$?
    trap - USR1 TERM
    moe_say "step ended with exit code $rc${_moe_signal:+ after SIG$_moe_signal}"
    if [ -n "$_moe_signal" ] || [ "$rc" -eq "$MOE_PREEMPT_EXIT" ]; then
        moe_requeue
    fi
    exit "$rc"
}

# moe_requeue: put this job back in the queue (same job id, same run directory), at most
# MOE_MAX_REQUEUES times (default 50) so a job that is preempted at once every time stops.
moe_requeue() {
    local max=${MOE_MAX_REQUEUES:-50} restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "$max" ]; then
        moe_say "not requeueing: already restarted $restarts times (MOE_MAX_REQUEUES=$max)"
        exit "$MOE_PREEMPT_EXIT"
    fi
    moe_say "requeueing job $SLURM_JOB_ID; it will resume from the newest checkpoint in $RUN_DIR"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    moe_say "scontrol requeue failed (was the job submitted with --no-requeue?); resubmit it to resume"
    exit "$MOE_PREEMPT_EXIT"
}
