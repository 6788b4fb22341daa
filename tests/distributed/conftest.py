"""Multi-process tests: keep every rank single-threaded and make `harness` importable.

pytest puts this directory on sys.path (rootdir-relative import, no __init__.py), so test files
import the helper as ``from harness import run_distributed``; spawned ranks inherit sys.path.
"""

from __future__ import annotations

import os

# Set before any rank is spawned so children inherit it (2 shared cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
