#!/usr/bin/env bash
# Downloads, here, the wheels that scripts/gpu_check.sh installs on a GPU machine without network:
# the packages its image lacks (Opacus and BackPACK for the field benchmark, import-linter for the
# layout test), for CPython 3.12 on x86-64. They land in .whl/ (gitignored); carry .whl to the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl opacus backpack-for-pytorch unfoldNd import-linter grimp opt-einsum
ls -la .whl
