#!/usr/bin/env bash
# The main job: installs what is needed, then runs the digits scoring demo (see README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m issgd demo "$@"
