#!/usr/bin/env bash
# The test suite: unit, multi-process (gloo, 2 and 4 ranks), launchers and end-to-end runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
       TRITON_INTERPRET=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false \
       TORCH_EXTENSIONS_DIR="$PWD/.torch_ext"
exec timeout 2400 python -m pytest -q -p no:cacheprovider tests "$@"
