#!/usr/bin/env bash
# Launch `moe-dist train` with the DeepSpeed launcher (`deepspeed`, deepspeed.launcher.runner).
#
# Usage: launch/deepspeed.sh [moe-dist train arguments...]
#   launch/deepspeed.sh --config configs/tiny.yaml train.engine=deepspeed zero.stage=2
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh --config configs/tiny.yaml ...
#
# Environment:
#   NPROC        processes per node (deepspeed --num_gpus; default: the GPUs nvidia-smi
#                lists, else 1)
#   HOSTFILE     DeepSpeed hostfile ("<host> slots=<n>" per line; see launch/hostfile.example).
#                Unset: this machine only. Set: every host must resolve, and the launcher
#                reaches the other hosts through pdsh/ssh (or DS_LAUNCHER, below).
#   NNODES       use the first NNODES hosts of HOSTFILE (deepspeed --num_nodes)
#   MASTER_ADDR  address of the first host (default: 127.0.0.1 alone, else DeepSpeed asks
#                the first host for `hostname -I`)
#   MASTER_PORT  rendezvous port (default 29500)
#   DS_LAUNCHER  multi-node backend: pdsh (default), openmpi, mvapich, slurm, ...
#   PYTHON       interpreter (default python3); DS_ARGS extra launcher flags
# The launcher is independent of the engine: add train.engine=deepspeed to train with
# DeepSpeed ZeRO. moe_dist reads RANK/LOCAL_RANK from the environment, so the launcher is
# run with --no_local_rank (no --local_rank=N argument appended).
# On SIGTERM/SIGINT the launcher sends SIGTERM to the workers (they checkpoint and exit 124)
# and kills them 30 s later.
set -euo pipefail

SCRIPT="${BASH_SOURCE[0]}"
. "$(dirname "$SCRIPT")/lib.sh"
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

# check_hostfile FILE: every non-comment line is "<host> slots=<n>" and <host> resolves.
# DeepSpeed itself would only fail later, inside pdsh/ssh, with a less direct message.
check_hostfile() {
    local file=$1 lineno=0 line host slots rest
    [ -f "$file" ] || die "HOSTFILE=$file does not exist"
    local hosts=0
    while IFS= read -r line || [ -n "$line" ]; do
        lineno=$((lineno + 1))
        line=${line%%#*}
        read -r host slots rest <<<"$line" || true
        [ -n "${host:-}" ] || continue
        [[ "${slots:-}" =~ ^slots=[1-9][0-9]*$ ]] && [ -z "${rest:-}" ] ||
            die "HOSTFILE=$file line $lineno: '$line' must read '<host> slots=<n>' (n >= 1)"
        getent hosts "$host" >/dev/null ||
            die "HOSTFILE=$file line $lineno: host '$host' does not resolve; fix the name or add it to /etc/hosts"
        hosts=$((hosts + 1))
    done <"$file"
    [ "$hosts" -gt 0 ] || die "HOSTFILE=$file names no hosts"
}

PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-}
if [ -z "$NPROC" ]; then
    NPROC=$(gpu_count)
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC ($NPROC) must be a positive integer"

args=(--num_gpus="$NPROC" --master_port="${MASTER_PORT:-29500}" --no_local_rank)
if [ -n "${HOSTFILE:-}" ]; then
    check_hostfile "$HOSTFILE"
    args+=(--hostfile="$HOSTFILE" --launcher="${DS_LAUNCHER:-pdsh}")
    [ -z "${NNODES:-}" ] || args+=(--num_nodes="$NNODES")
    [ -z "${MASTER_ADDR:-}" ] || args+=(--master_addr="$MASTER_ADDR")
else
    [ "${NNODES:-1}" -eq 1 ] || die "NNODES=$NNODES needs HOSTFILE listing the nodes"
    # DeepSpeed reads a default hostfile at /job/hostfile; an empty-but-present one would
    # silently change the launch, so point it at a file that cannot exist.
    args+=(--hostfile=/nonexistent/moe-dist-single-node)
fi
# shellcheck disable=SC2206  # DS_ARGS is a list of flags, split on purpose
extra=(${DS_ARGS:-})

set -x
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" "${extra[@]}" \
    --module moe_dist.cli train "$@"
