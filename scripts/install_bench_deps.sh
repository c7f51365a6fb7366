#!/usr/bin/env bash
# Installs the libraries the benchmarks compare against (Opacus, BackPACK) without touching torch.
#
# Their wheels list torch (and BackPACK torchvision) as dependencies: a plain `pip install` may
# resolve them to another torch build (a multi-GB CUDA one on a CPU machine). So every package
# goes in with --no-deps, its non-torch dependencies are named here by hand, and the script
# refuses to go on if pip would install torch, and fails if torch's version changed anyway.
#   opacus 1.6:                 numpy, scipy, opt-einsum (+ torch)
#   backpack-for-pytorch 1.7:   einops, unfoldNd (+ torch, torchvision)
#   unfoldNd 0.2:               numpy, packaging (+ torch)
# torchvision is left out on purpose: BackPACK imports it only in backpack/utils/examples.py
# (MNIST loaders for its tutorials), never from `import backpack` or its extensions.
# Idempotent: a package whose module already imports is not reinstalled.
set -euo pipefail
PY=${PYTHON:-python3}

torch_version() { "$PY" -c 'import torch; print(torch.__version__)'; }
before=$(torch_version) || { echo "install_bench_deps: install torch first (see scripts/install.sh)" >&2; exit 1; }

missing=()
for spec in numpy scipy opt_einsum:opt-einsum packaging einops unfoldNd opacus backpack:backpack-for-pytorch; do
  module=${spec%%:*}; package=${spec#*:}
  "$PY" -c "import $module" 2>/dev/null || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_bench_deps: opacus and backpack already import (torch $before)"
  exit 0
fi

plan=$("$PY" -m pip install --dry-run --no-deps "${missing[@]}" 2>&1) || { echo "$plan" >&2; exit 1; }
if grep -Eiq '^Would install.* (torch|torchvision)-[0-9]' <<<"$plan"; then
  echo "install_bench_deps: refusing: pip would install torch or torchvision:" >&2
  grep -i '^Would install' <<<"$plan" >&2
  exit 1
fi
"$PY" -m pip install --quiet --no-deps "${missing[@]}"

after=$(torch_version)
if [ "$before" != "$after" ]; then
  echo "install_bench_deps: torch changed from $before to $after; reinstall torch==$before" >&2
  exit 1
fi
"$PY" -c 'import opacus, backpack, torch; from importlib.metadata import version as v
print("install_bench_deps: opacus", v("opacus"), "backpack-for-pytorch", v("backpack-for-pytorch"), "with torch", torch.__version__)'
