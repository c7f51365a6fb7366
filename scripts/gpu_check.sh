#!/usr/bin/env bash
# One prepared run that answers the GPU questions in a single short lease (see README, "GPU checks").
#
#   bash scripts/gpu_check.sh [--quick] [--device cuda|cpu] [--out DIR]
#
# Steps, each with its own time limit and log, independent of each other (one failing does not hide
# the rest): env, build, compile (ahead-of-time Triton and nvcc resource checks), tests, bench,
# trainer. Budget: the full run fits in 10 minutes of wall time on one H100/H200, --quick in 4.
# --device cpu --quick is the dry run that proves the script and its budget on a CPU machine.
# Writes DIR/ (default runs/gpu_check/<device>/): steps.tsv (step, status, seconds), one log per
# step, environment.json (device, versions, commit, date) and the benchmark tables; with
# --device cuda the tables also go to benchmarks/results/<gpu>/ (full run) to be committed.
# Nothing is downloaded: packages missing on the machine travel as wheels in .whl/
# (scripts/gpu_wheels.sh prepares them) and are installed from there when present.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

QUICK=0; DEVICE=cuda; OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --device) DEVICE=$2; shift ;;
    --device=*) DEVICE=${1#*=} ;;
    --out) OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#*=} ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-runs/gpu_check/$DEVICE}
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.tsv"
export PYTHONUNBUFFERED=1
export ISGD_COMMIT=${ISGD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[ "$DEVICE" = cuda ] && unset TRITON_INTERPRET
START=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with a time limit, logs to OUT_DIR/NAME.log,
# records the outcome; never stops the script.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) status
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  status=$?
  local took=$(( $(date +%s) - t0 ))
  case $status in 0) status=ok ;; 124|137) status="timeout" ;; *) status="failed($status)" ;; esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$took" >> "$OUT_DIR/steps.tsv"
  echo "   $status in ${took}s; last lines of $OUT_DIR/$name.log:"
  tail -n 6 "$OUT_DIR/$name.log" | sed 's/^/   | /'
}

if [ "$QUICK" = 1 ]; then
  T_BUILD=150; T_COMPILE=60; T_TESTS=60; T_BENCH=60; T_TRAIN=40
  # The kernel families on this device (on CPU without the Triton interpreter, a test tool too slow here).
  TESTS=(tests/linear_norms tests/conv_norms tests/alias -x -q -k "$([ "$DEVICE" = cuda ] && echo cuda || echo 'cpu and not triton')")
  BENCH=(--quick --only linear,conv,sampler --out "$OUT_DIR/bench")
  TRAIN=(--steps 200 --diag-every 100)
else
  T_BUILD=180; T_COMPILE=90; T_TESTS=150; T_BENCH=240; T_TRAIN=90
  TESTS=(tests -q -x --deselect tests/test_layout.py::test_import_contracts_hold)
  BENCH=(--out "$OUT_DIR/bench")
  TRAIN=(--steps 1000 --diag-every 250)
  [ "$DEVICE" = cuda ] && BENCH=(--publish)
fi

# Carried wheels (Opacus, BackPACK, import-linter: absent from the GPU image), installed beside it.
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/isgd_site .whl/*.whl
  export PYTHONPATH=/tmp/isgd_site${PYTHONPATH:+:$PYTHONPATH}
fi

step env 30 "$PY" - "$DEVICE" "$OUT_DIR/environment.json" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import torch
device = sys.argv[1]
info = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "commit": os.environ.get("ISGD_COMMIT"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
json.dump(info, open(sys.argv[2], "w"), indent=1)
print({k: v for k, v in info.items() if k != "nvidia_smi"})
EOF

# Build for the GPU at hand only (one arch compiles in about half the time of two).
if [ "$DEVICE" = cuda ]; then
  ARCH=$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90)
  step build "$T_BUILD" env ISGD_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" ISGD_REBUILD=1 bash scripts/install.sh
else
  step build "$T_BUILD" bash scripts/install.sh
fi

# What a compiler can prove: every Triton kernel configuration compiles for sm_80/sm_90 on this
# machine's Triton; every CUDA kernel's registers, spills and shared memory (nvcc -Xptxas -v).
COMPILE_TESTS=$(ls tests/test_triton_compile.py tests/test_cuda_sources.py tests/csrc/*.py 2>/dev/null | tr '\n' ' ')
step compile "$T_COMPILE" "$PY" -m pytest $COMPILE_TESTS -q

step tests "$T_TESTS" "$PY" -m pytest "${TESTS[@]}"

step bench "$T_BENCH" "$PY" -m benchmarks --device "$DEVICE" "${BENCH[@]}"

step trainer "$T_TRAIN" "$PY" -m issgd train --mode both --workers 2 --device "$DEVICE" --no-progress \
  --out "$OUT_DIR/trainer" "${TRAIN[@]}"

TOTAL=$(( $(date +%s) - START ))
printf 'total\t-\t%s\n' "$TOTAL" >> "$OUT_DIR/steps.tsv"
echo "== done in ${TOTAL}s: $OUT_DIR/steps.tsv"
column -t "$OUT_DIR/steps.tsv" 2>/dev/null || cat "$OUT_DIR/steps.tsv"
# On a lent machine, $OUT is what comes back: one archive and the step table.
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  tar czf "$OUT/gpu_check.tgz" "$OUT_DIR" $( [ "$DEVICE" = cuda ] && ls -d benchmarks/results/*/ 2>/dev/null | grep -v /cpu/ )
  cp "$OUT_DIR/steps.tsv" "$OUT/steps.tsv"
fi
grep -q -v -P '\tok\t|^total\t' "$OUT_DIR/steps.tsv" && exit 1 || exit 0
