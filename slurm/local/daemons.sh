# Shared by slurm/local/start.sh and stop.sh (sourced, not run): logging and daemon control
# by pid file, without systemd.

say() { echo "[slurm-local] $*" >&2; }

running() {  # running PIDFILE COMM
    [ -s "$1" ] || return 1
    local pid
    pid=$(cat "$1")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
halt() {  # halt PIDFILE COMM: SIGTERM, up to 10 s grace, then SIGKILL
    if running "$1" "$2"; then
        local pid
        pid=$(cat "$1")
        say "stopping $2 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        if [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
            say "$2 (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}
