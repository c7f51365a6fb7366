#!/usr/bin/env bash
# Installs what isgd_kernels needs into the current Python, then builds the package in place.
# Idempotent and offline-friendly: a dependency that already imports is not reinstalled, and an
# installed torch (CPU or CUDA build) is never replaced. Prints one line per phase.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
say() { echo "[install] $*"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pinned on purpose: an unpinned torch resolves to a multi-GB CUDA build.
  say "installing torch ${ISGD_TORCH_VERSION:-2.13.0} (CPU build; about 200 MB)"
  "$PY" -m pip install --quiet --quiet "torch==${ISGD_TORCH_VERSION:-2.13.0}"
fi

missing=()
for spec in numpy tqdm pytest:pytest pytest_benchmark:pytest-benchmark sklearn:scikit-learn \
            matplotlib triton ninja importlinter:import-linter; do
  module=${spec%%:*}; package=${spec#*:}
  "$PY" -c "import $module" 2>/dev/null || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  "$PY" -m pip install --quiet --quiet "${missing[@]}"
fi

# Build against the installed torch (no isolated build env: it would fetch another torch).
# Rebuild when the extension does not import, when a C++/CUDA source is newer than it, or on request.
so=$(ls isgd_kernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null | head -n 1)" ] \
   || ! "$PY" -c "import isgd_kernels._C" 2>/dev/null || [ "${ISGD_REBUILD:-0}" = 1 ]; then
  say "building the C++ extension isgd_kernels._C (about 1.5 min on 2 cores; CUDA kernels too when torch has CUDA)"
  log=$(mktemp)
  # pip -v shows ninja's [k/n] progress lines; the rest goes to the log, printed only on failure.
  set +e
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$log" \
    | { grep --line-buffered -E '^[[:space:]]*\[[0-9]+/[0-9]+\]' \
        | sed -u -E 's/^[[:space:]]*(\[[0-9]+\/[0-9]+\]) .* -c ([^ ]+).*/  \1 compiling \2/'; true; }
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"; rm -f "$log"; say "build failed (the end of its log is above)"; exit 1
  fi
  rm -f "$log"
fi
"$PY" -c "import isgd_kernels._C" 2>/dev/null || { say "isgd_kernels._C does not import after the build"; exit 1; }
say "ready: $("$PY" -c 'import torch, isgd_kernels; print(f"isgd_kernels {isgd_kernels.__version__}, torch {torch.__version__}")')"
