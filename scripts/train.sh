#!/usr/bin/env bash
# The main job: installs what is needed, then trains ISSGD against uniform SGD on the generated longtail
# data with 2 scoring worker processes, printing the variance/loss table and writing plots (see README).
# Extra flags go to `issgd train` (e.g. --seeds 5, --steps 4000, --dataset digits, --model cnn).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m issgd train --mode both --workers 2 --diag-every 50 --dataset longtail --out runs/longtail "$@"
