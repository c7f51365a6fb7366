#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA extension, run the whole test suite on CUDA, run
# every benchmark group, and gather logs + results (benchmarks/results/<gpu>/) into $OUT.
# BENCH_ARGS replaces the default --publish (e.g. BENCH_ARGS=--quick: results in runs/benchmarks/<gpu>/).
# Needs torch with CUDA, triton, nvcc; no network (nothing is downloaded).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/isgd_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
time python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import isgd_kernels as ik, torch; d=torch.device('cuda'); print({b: ik.backend_available(b, d, '_linear_sq_norms_ghost') for b in ik.BACKENDS})"
python3 -m pytest tests -q -x 2>&1 | tee "$OUT/tests.log" | tail -15
python3 -m benchmarks --device cuda ${BENCH_ARGS:---publish} 2>&1 | tee "$OUT/bench.log" | tail -40
# The trainer on the GPU: ISSGD vs uniform SGD with 2 scoring workers sharing it.
python3 -m issgd train --mode both --workers 2 --device cuda --no-progress --out "$OUT/train_cuda" 2>&1 | tee "$OUT/train.log" | tail -15
tar czf "$OUT/results.tgz" benchmarks/results $([ -d runs/benchmarks ] && echo runs/benchmarks)
