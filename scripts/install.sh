#!/usr/bin/env bash
# Installs what isgd_kernels needs into the current Python, then builds the package in place.
# Idempotent and offline-friendly: a dependency that already imports is not reinstalled, and an
# installed torch (CPU or CUDA build) is never replaced.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pinned on purpose: an unpinned torch resolves to a multi-GB CUDA build.
  "$PY" -m pip install --quiet "torch==${ISGD_TORCH_VERSION:-2.13.0}"
fi

missing=()
for spec in numpy tqdm pytest:pytest pytest_benchmark:pytest-benchmark sklearn:scikit-learn \
            matplotlib triton ninja importlinter:import-linter; do
  module=${spec%%:*}; package=${spec#*:}
  "$PY" -c "import $module" 2>/dev/null || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install --quiet "${missing[@]}"
fi

# Build against the installed torch (no isolated build env: it would fetch another torch).
# Rebuild when the extension does not import, when a C++/CUDA source is newer than it, or on request.
so=$(ls isgd_kernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null | head -n 1)" ] \
   || ! "$PY" -c "import isgd_kernels._C" 2>/dev/null || [ "${ISGD_REBUILD:-0}" = 1 ]; then
  "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
