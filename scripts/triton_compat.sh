#!/usr/bin/env bash
# Ahead-of-time compile test (tests/test_triton_compile.py) under another Triton, default 3.6.0 -- the
# Triton that CUDA builds of torch 2.11 ship -- in a reused, gitignored venv beside the current
# Python's torch (--system-site-packages; only triton is installed in it, pinned, without deps, so pip
# never resolves a torch). No GPU needed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VER=${ISGD_COMPAT_TRITON:-3.6.0}
MAJMIN=${VER%.*}
VENV=${ISGD_COMPAT_VENV:-.venv-triton${MAJMIN//./}}

if ! "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$VER')" 2>/dev/null; then
  "$PY" -m venv --system-site-packages "$VENV"
  echo "[triton-compat] installing triton==$VER into $VENV (once)"
  "$VENV/bin/python" -m pip install --quiet --quiet --no-deps "triton==$VER"
fi
# Test this checkout's package, whatever isgd_kernels the base Python has installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest tests/test_triton_compile.py -q -p no:cacheprovider "$@"
