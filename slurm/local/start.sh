#!/usr/bin/env bash
# Start a real Slurm cluster on this one machine for moe_dist's tests.
#
# Installs slurmctld, slurmd, slurm-client and munge from the distribution's packages
# (Debian 12 / Ubuntu), writes a single-host slurm.conf with N emulated nodes (node1..nodeN,
# one slurmd each; Debian builds Slurm with MULTIPLE_SLURMD), starts munged, slurmctld and
# the slurmds without systemd, and waits until every node is idle.
# Idempotent: a healthy cluster with an unchanged configuration is left alone (< 1 s).
#
# Must run as root. Settings (environment variables, all optional):
#   SLURM_LOCAL_NODES=2          emulated nodes
#   SLURM_LOCAL_CPUS=$(nproc)    CPUs declared per node (may exceed the real cores)
#   SLURM_LOCAL_MEM_MB=          RealMemory per node; empty = 80% of RAM / nodes
#   SLURM_LOCAL_DIR=/var/lib/moe-dist-slurm   state, spool, logs, pid files
#   SLURM_LOCAL_PORT_BASE=17000  slurmd of node i listens on PORT_BASE + i
#   SLURM_LOCAL_CTLD_PORT=6817   slurmctld port
#   SLURM_LOCAL_TIMEOUT=60       seconds to wait for idle nodes
#   SLURM_LOCAL_WITH_MPI=0       1 = also install Debian's Open MPI (openmpi-bin, libopenmpi-dev)
# Stop with slurm/local/stop.sh. Facts behind each step: docs/launching.md, "Local Slurm".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
DIR=${SLURM_LOCAL_DIR:-/var/lib/moe-dist-slurm}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-17000}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
WITH_MPI=${SLURM_LOCAL_WITH_MPI:-0}
CONF=/etc/slurm/slurm.conf   # the path compiled into the packaged slurm commands
OWNER_TAG="# written by moe_dist slurm/local/start.sh"
HOSTS_TAG="# moe_dist local slurm nodes"
T0=$SECONDS

. "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"
fail() { say "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; fail "unknown argument '$1'" ;;
esac

[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs packages and starts daemons); try: sudo $0"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || fail "SLURM_LOCAL_NODES ($NODES) must be a positive integer"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || fail "SLURM_LOCAL_CPUS ($CPUS) must be a positive integer"

# ------------------------------------------------------------------ 1. packages
install_packages() {
    local wanted=() cmd
    for cmd in slurmctld slurmd sbatch srun sinfo scontrol munged munge; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            wanted+=(slurmctld slurmd slurm-client munge)
            break
        fi
    done
    # Slurm's mpi/pmix plugin dlopen()s the unversioned libpmix.so, which only the -dev
    # package ships; without it `srun --mpi=pmix` fails with "can not load PMIx library".
    if ! compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null; then
        wanted+=(libpmix-dev)
    fi
    if [ "$WITH_MPI" = 1 ] && ! [ -x /usr/bin/mpicc ]; then
        wanted+=(openmpi-bin libopenmpi-dev)
    fi
    [ ${#wanted[@]} -gt 0 ] || return 1
    command -v apt-get >/dev/null || fail "apt-get not found; install ${wanted[*]} by hand"
    say "installing ${wanted[*]}"
    # The packages' postinst would start the daemons through invoke-rc.d; forbid that
    # for the duration of the install (exit 101 = "action not allowed").
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    local attempt ok=0
    for attempt in 1 2 3; do
        if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
               "${wanted[@]}" >/dev/null; then
            ok=1
            break
        fi
        say "apt-get failed (attempt $attempt of 3)"
        sleep 3
    done
    [ "$added_policy" = 0 ] || rm -f "$policy"
    [ "$ok" = 1 ] || fail "could not install ${wanted[*]} with apt-get (see the output above)"
    say "installed $(slurmd -V) after $((SECONDS - T0)) s"
    return 0
}
JUST_INSTALLED=0
if install_packages; then JUST_INSTALLED=1; fi

# ------------------------------------------------------------------ 2. node names
# Job scripts take the first host of $SLURM_JOB_NODELIST as the rendezvous address, so
# node1..nodeN must resolve. /etc/hosts may be a bind mount: rewrite it in place.
HOST=$(hostname -s)
node_names=""
for i in $(seq 1 "$NODES"); do node_names+=" node$i"; done
hosts_line="127.0.0.1${node_names} ${HOSTS_TAG}"
if ! grep -qxF "$hosts_line" /etc/hosts; then
    kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
    extra=""
    getent hosts "$HOST" >/dev/null 2>&1 || extra="127.0.0.1 ${HOST} ${HOSTS_TAG}"$'\n'
    if ! printf '%s\n%s%s\n' "$kept" "$extra" "$hosts_line" > /etc/hosts; then
        say "WARNING: cannot write /etc/hosts; node1..node$NODES will not resolve"
    fi
fi

# ------------------------------------------------------------------ 3. munge
# munged refuses to run as root ("Logfile is insecure") and /run/munge is normally made
# by systemd-tmpfiles, so create the directories and start it as the munge user.
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create ||
        fail "could not create /etc/munge/munge.key with mungekey"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mkdir -p "$DIR/run"
if ! munge_ok; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start: $(tail -n 3 /var/log/munge/munged.log 2>/dev/null)"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || fail "munge credentials do not verify; see /var/log/munge/munged.log"
    # remember that we started it, so stop.sh stops it (and only then)
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
fi

# ------------------------------------------------------------------ 4. configuration
mkdir -p "$DIR/state" "$DIR/log" /etc/slurm
for i in $(seq 1 "$NODES"); do mkdir -p "$DIR/spool/node$i" "$DIR/tmp/node$i"; done
install -m 0755 "$HERE/task_prolog.sh" "$DIR/task_prolog.sh"

real_mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[ -n "$real_mem" ] || fail "slurmd -C did not report RealMemory"
MEM=${SLURM_LOCAL_MEM_MB:-$((real_mem * 8 / 10 / NODES))}
[ "$MEM" -ge 1 ] || fail "SLURM_LOCAL_MEM_MB ($MEM) must be >= 1"

if [ "$NODES" -eq 1 ]; then nodelist=node1; else nodelist="node[1-$NODES]"; fi
rendered="$DIR/slurm.conf.rendered"
{
    echo "$OWNER_TAG"
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        "$HERE/slurm.conf.in"
    for i in $(seq 1 "$NODES"); do
        echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT_BASE + i))" \
             "CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP"
} > "$rendered"

# ------------------------------------------------------------------ 5. daemons

fresh_state=""
restart=$JUST_INSTALLED   # daemons that predate an install (say of libpmix-dev) must restart
if ! cmp -s "$rendered" "$CONF"; then
    if [ -f "$CONF" ] && ! grep -qF "$OWNER_TAG" "$CONF"; then
        backup="$CONF.before-moe-dist.$(date +%s)"
        cp "$CONF" "$backup"
        say "kept the existing $CONF as $backup"
    fi
    say "configuration changed: (re)starting the daemons with fresh state"
    restart=1
    fresh_state=-c
fi
if [ "$restart" = 1 ]; then
    # every slurmd with a pid file, including nodes a lowered SLURM_LOCAL_NODES dropped
    for f in "$DIR"/run/slurmd-*.pid; do
        if [ -e "$f" ]; then halt "$f" slurmd; fi
    done
    halt "$DIR/run/slurmctld.pid" slurmctld
fi
[ -z "$fresh_state" ] || install -m 0644 "$rendered" "$CONF"

if ! running "$DIR/run/slurmctld.pid" slurmctld; then
    slurmctld $fresh_state ||
        fail "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
fi
for i in $(seq 1 "$NODES"); do
    if ! running "$DIR/run/slurmd-node$i.pid" slurmd; then
        slurmd -N "node$i" ||
            fail "slurmd for node$i did not start: $(tail -n 5 "$DIR/log/slurmd-node$i.log" 2>/dev/null)"
    fi
done

# ------------------------------------------------------------------ 6. wait for idle nodes
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    states=$(sinfo --noheader --Node --format='%N %T' 2>/dev/null | sort -u || true)
    # state names may carry a flag suffix such as '*' (not responding) or '~' (powered off)
    ready=$(awk '{ s = $2; sub(/[^a-z]+$/, "", s) } s ~ /^(idle|mixed|allocated|completing)$/' \
            <<<"$states" | wc -l)
    [ "$ready" -ge "$NODES" ] && break
    stuck=$(awk '$2 ~ /^(down|drain|fail|inval)/ { print $1 }' <<<"$states" | paste -sd, -)
    if [ -n "$stuck" ] && [ "$resumed" = 0 ] && [ $((deadline - SECONDS)) -lt $((TIMEOUT - 3)) ]; then
        say "resuming $stuck"
        scontrol update NodeName="$stuck" State=RESUME 2>/dev/null || true
        resumed=1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        sinfo --Node --long >&2 || true
        sinfo --list-reasons >&2 || true
        tail -n 15 "$DIR"/log/*.log >&2 || true
        fail "nodes not idle after ${TIMEOUT} s (SLURM_LOCAL_TIMEOUT); daemon logs are in $DIR/log"
    fi
    sleep 0.2
done

sinfo >&2
say "ready after $((SECONDS - T0)) s: $NODES node(s) x $CPUS CPUs, $MEM MB each; logs in $DIR/log"
