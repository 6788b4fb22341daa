#!/usr/bin/env bash
# Take the TensorBoard screenshots of docs/guide/monitoring.md from a real run:
#
#   bash scripts/tensorboard_screenshots.sh [section.key=value ...]
#
# 1. trains configs/tiny.yaml for a short while (fixed capacity 1.0, so the drop rate and the
#    realised k have something to show; extra arguments are more `moe-dist train` overrides);
# 2. starts TensorBoard on 127.0.0.1 (loopback only) on a free port and waits until it has
#    loaded the moe/ scalars, the load histograms and the heat-map;
# 3. screenshots three views with headless Chromium into docs/img/:
#      tensorboard-scalars.png     scalars dashboard filtered to moe/
#      tensorboard-histograms.png  per-layer expert-load histograms
#      tensorboard-images.png      the layers x experts load heat-map
#    and retakes a picture that comes out (nearly) blank;
# 4. stops TensorBoard and deletes the temporary run, whatever happens.
#
# Needs Chromium: `apt-get install -y chromium` (Debian) or set CHROMIUM=/path/to/chrome.
# Settings (environment, optional):
#   SHOTS_OUT=docs/img      where the PNGs go
#   SHOTS_STEPS=100         training steps of the run
#   SHOTS_RUN_DIR=          reuse this run directory instead of training (its tb/ must exist)
#   SHOTS_BUDGET_MS=15000   Chromium's virtual time budget per page (TensorBoard's JS needs it)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
OUT=${SHOTS_OUT:-docs/img}
STEPS=${SHOTS_STEPS:-100}
BUDGET_MS=${SHOTS_BUDGET_MS:-15000}
CHROMIUM=${CHROMIUM:-chromium}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # raise it on an idle machine

command -v "$CHROMIUM" >/dev/null || { echo "error: $CHROMIUM not found; install it with" \
    "'apt-get install -y chromium' or set CHROMIUM=/path/to/chromium" >&2; exit 1; }

WORK=$(mktemp -d)
TB_PID=""
cleanup() {
    if [ -n "$TB_PID" ] && kill -0 "$TB_PID" 2>/dev/null; then
        kill "$TB_PID" 2>/dev/null || true
        wait "$TB_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. a short real run ----------------------------------------------------------------
if [ -n "${SHOTS_RUN_DIR:-}" ]; then
    RUN_DIR=$SHOTS_RUN_DIR
else
    RUN_DIR=$WORK/tiny-fixed-capacity
    echo "== training $STEPS steps into $RUN_DIR"
    moe-dist train --config configs/tiny.yaml --run-dir "$RUN_DIR" \
        train.steps="$STEPS" train.eval_every=50 checkpoint.every=0 log.every=5 \
        log.progress_bar=false moe.capacity.policy=fixed moe.capacity.capacity_factor=1.0 "$@"
fi
[ -d "$RUN_DIR/tb" ] || { echo "error: $RUN_DIR/tb does not exist" >&2; exit 1; }

# ---- 2. TensorBoard on loopback ---------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
echo "== tensorboard on $URL"
tensorboard --logdir "$RUN_DIR/tb" --host 127.0.0.1 --port "$PORT" >"$WORK/tensorboard.log" 2>&1 &
TB_PID=$!
python3 - "$URL" <<'EOF'
import json, sys, time, urllib.request

url = sys.argv[1]
wanted = {"scalars": "moe/", "histograms": "moe/", "images": "moe/load_heatmap"}
deadline = time.monotonic() + 120
while True:
    try:
        missing = []
        for plugin, prefix in wanted.items():
            with urllib.request.urlopen(f"{url}/data/plugin/{plugin}/tags", timeout=5) as reply:
                tags = [t for run in json.load(reply).values() for t in run]
            if not any(t.startswith(prefix) for t in tags):
                missing.append(plugin)
        if not missing:
            break
    except OSError as exc:
        missing = [str(exc)]
    if time.monotonic() > deadline:
        sys.exit(f"error: TensorBoard did not serve the moe/ data within 120 s ({missing})")
    time.sleep(1)
EOF

# ---- 3. screenshots ---------------------------------------------------------------------
shoot() {  # shoot NAME HEIGHT FRAGMENT
    local png="$OUT/tensorboard-$1.png" attempt budget=$BUDGET_MS
    mkdir -p "$OUT"
    for attempt in 1 2 3; do
        rm -f "$png"
        "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
            --disable-background-networking --disable-component-update --disable-sync \
            --hide-scrollbars --user-data-dir="$WORK/profile-$1-$attempt" --window-size="1400,$2" \
            --virtual-time-budget="$budget" --screenshot="$png" "$URL/$3" \
            >"$WORK/chromium-$1.log" 2>&1 || true
        if [ -f "$png" ] && python3 - "$png" <<'EOF'
import sys
from PIL import Image

# A page that has drawn its charts has many colours and no colour covering nearly everything.
image = Image.open(sys.argv[1]).convert("RGB")
counts = image.getcolors(maxcolors=1 << 20) or []
largest = max(c for c, _ in counts) / (image.width * image.height)
sys.exit(0 if len(counts) > 200 and largest < 0.9 else 1)
EOF
        then
            echo "== $png (attempt $attempt)"
            return 0
        fi
        budget=$((budget * 2))
        echo "   $png looks blank, retrying with a ${budget} ms budget"
    done
    echo "error: could not take a non-blank $png; see $WORK/chromium-$1.log" >&2
    tail -5 "$WORK/chromium-$1.log" >&2
    return 1
}

shoot scalars 1000 "#scalars&tagFilter=moe%2F"
shoot histograms 480 "#histograms"
shoot images 440 "#images"
echo "== done; TensorBoard stopped"
