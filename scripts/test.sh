#!/usr/bin/env bash
# The test command: installs what is needed, then runs the whole suite (CPU; CUDA too when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest tests "$@"
