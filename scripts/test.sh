#!/usr/bin/env bash
# The test command: installs what is needed, then runs the whole suite (CPU; CUDA too when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
"${PYTHON:-python3}" -m pytest tests "$@"
# The ahead-of-time compile test once more under Triton 3.6 (CUDA builds of torch 2.11 ship it), in a
# gitignored venv beside this torch. ISGD_TRITON_COMPAT=0 skips it.
if [ "${ISGD_TRITON_COMPAT:-1}" = 1 ]; then
  bash scripts/triton_compat.sh
fi
