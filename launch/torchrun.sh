#!/usr/bin/env bash
# Launch `moe-dist train` with torchrun (torch.distributed.run).
#
# Usage: launch/torchrun.sh [moe-dist train arguments...]
#   launch/torchrun.sh --config configs/tiny.yaml parallel.ep=2
#   NPROC=4 launch/torchrun.sh --config configs/tiny.yaml --dry-run
#
# Environment:
#   NPROC        processes per node (default: the GPUs nvidia-smi lists, else 1)
#   NNODES       nodes (default 1). With 1 node torchrun runs --standalone on a free port.
#   NODE_RANK    this node's rank in [0, NNODES): static rendezvous, node ranks fixed
#   MASTER_ADDR  host of node 0 (required when NNODES > 1)
#   MASTER_PORT  rendezvous port on MASTER_ADDR (default 29500)
#   RDZV_ID      with NNODES > 1 and no NODE_RANK: c10d rendezvous id shared by all nodes
#                (default moe-dist); node ranks are assigned at rendezvous
#   PYTHON       interpreter (default python3); TORCHRUN_ARGS extra torchrun flags
# Multi node, static:  on node i of 2: NNODES=2 NODE_RANK=i MASTER_ADDR=node0 launch/torchrun.sh ...
# Multi node, c10d:    on every node:  NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh ...
# torchrun forwards SIGTERM/SIGINT/SIGUSR1 to the workers, which checkpoint and exit 124.
set -euo pipefail

SCRIPT="${BASH_SOURCE[0]}"
. "$(dirname "$SCRIPT")/lib.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NPROC=${NPROC:-}
if [ -z "$NPROC" ]; then
    NPROC=$(gpu_count)
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC ($NPROC) must be a positive integer"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES ($NNODES) must be a positive integer"

args=(--nproc-per-node="$NPROC")
if [ "$NNODES" -eq 1 ] && [ -z "${NODE_RANK:-}" ]; then
    args+=(--standalone)
else
    [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES needs MASTER_ADDR (the host of node 0)"
    port=${MASTER_PORT:-29500}
    args+=(--nnodes="$NNODES")
    if [ -n "${NODE_RANK:-}" ]; then
        [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] ||
            die "NODE_RANK ($NODE_RANK) must be in [0, NNODES=$NNODES)"
        args+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$port")
    else
        args+=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$port"
               --rdzv-id="${RDZV_ID:-moe-dist}")
    fi
fi
# torchrun >= 2.9 reads flags from PET_* variables (older versions ignore them): handle
# SIGUSR1 (Slurm's usual warning signal) like SIGTERM, i.e. pass it on to the workers and
# give them time to write their checkpoint before SIGKILL.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-270}
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of flags, split on purpose
extra=(${TORCHRUN_ARGS:-})

set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "${extra[@]}" -m moe_dist.cli train "$@"
