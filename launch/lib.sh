# Shared by the launch scripts (sourced, not run). The sourcing script sets SCRIPT to its own path.

# The script's header comment (line 2 up to `set -euo pipefail`) is its usage text.
usage() { sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "launch/$(basename "$SCRIPT"): error: $*" >&2; exit 2; }

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
