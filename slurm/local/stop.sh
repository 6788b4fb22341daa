#!/usr/bin/env bash
# Stop the local Slurm cluster that slurm/local/start.sh started, by PID file.
#
# Cancels queued and running jobs, then stops the slurmds (in parallel), slurmctld and,
# only if start.sh started it, munged. Each daemon gets SIGTERM and 10 s before SIGKILL.
# Safe to run when nothing is running.
#   --purge   also delete $SLURM_LOCAL_DIR, /etc/slurm/slurm.conf (only if start.sh wrote
#             it) and the /etc/hosts line for the emulated nodes. Packages stay installed.
# Settings: SLURM_LOCAL_DIR=/var/lib/moe-dist-slurm (must match start.sh).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/lib/moe-dist-slurm}
CONF=/etc/slurm/slurm.conf
OWNER_TAG="# written by moe_dist slurm/local/start.sh"
HOSTS_TAG="# moe_dist local slurm nodes"
T0=$SECONDS

. "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

purge=0
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --purge) purge=1 ;;
    "") ;;
    *) usage >&2; say "ERROR: unknown argument '$1'"; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { say "ERROR: must run as root"; exit 1; }


# 1. jobs first, so that their slurmstepd processes end cleanly
if running "$DIR/run/slurmctld.pid" slurmctld; then
    jobs=$(squeue --noheader --format=%i 2>/dev/null | paste -sd' ' - || true)
    if [ -n "$jobs" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(squeue --noheader --format=%i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

# 2. daemons: compute nodes in parallel, then the controller, then munge
shopt -s nullglob
pids=()
for f in "$DIR"/run/slurmd-*.pid; do
    halt "$f" slurmd &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
halt "$DIR/run/slurmctld.pid" slurmctld
if [ -e "$DIR/run/munged.pid" ]; then halt "$DIR/run/munged.pid" munged; fi

# 3. optional clean-up of everything start.sh wrote
if [ "$purge" = 1 ]; then
    rm -rf "$DIR"
    if [ -f "$CONF" ] && grep -qF "$OWNER_TAG" "$CONF"; then rm -f "$CONF"; fi
    if grep -qF "$HOSTS_TAG" /etc/hosts; then
        kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
        printf '%s\n' "$kept" > /etc/hosts
    fi
    say "purged $DIR"
fi
say "stopped after $((SECONDS - T0)) s"
