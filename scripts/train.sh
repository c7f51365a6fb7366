#!/usr/bin/env bash
# The main job: installs what is needed, then trains ISSGD against uniform SGD on the bundled digits
# data with 2 scoring worker processes, printing the variance/loss table and writing plots (see README).
# Extra flags go to `issgd train` (e.g. --steps 4000, --dataset synthetic, --model cnn).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m issgd train --mode both --workers 2 --diag-every 50 --out runs/digits "$@"
