#!/usr/bin/env bash
# Issue 31's GPU check in one call of at most 8 minutes, on a bare GPU machine (torch preinstalled, no network).
# It builds zsq_fast._C in place for the local GPU with every core, then runs, most valuable first, each step
# under its own `timeout` and writing its log / table into the output folder the moment it ends (a call cut
# short still returns what was done):
#   build    setup.py build_ext --inplace (MAX_JOBS = all cores; the local GPU's architecture)   build.log
#   smoke    every kernel once per layout/dtype/alignment case vs the reference (cuda_smoke.py)  smoke.log
#   tests    the CUDA tests (those named cuda or device_memory, in the files with CUDA tests)     tests.log, tests.xml
#   kernels  stats fwd/bwd and fake-quant GB/s vs copy bandwidth, fused AdaRound fwd+bwd+reg vs the eager
#            composite; ResNet-18 224 px and EfficientNet-Lite0 224 px shapes, batch 128        kernels.md
#   dgh      ResNet-18 224 px (random init, BN set on noise), 1024 images, exact, bf16, channels_last:
#            s per step and 1000 iterations extrapolated (labelled); device and host store       dgh.md
#   brecq    BRECQ W4A4 hw ms / iteration per block, ResNet-18 224 px, batch 32, fused vs eager  brecq.md
#   memory   peak device memory at N = 1024 and 16384, host store, CIFAR ResNet-20              memory.md
#   sanitizer  cuda_smoke.py under compute-sanitizer memcheck, when installed and time is left  sanitizer.log
# summary.md gets one line per step (exit code, seconds) as it ends; env.txt names the machine.
#
# Device tool (runs in the repo root with $OUT set; pytest and ninja come from .gpu_deps when the machine
# lacks them, see below):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_deps"], timeout_s=540)
# On CPU the same steps rehearse at tiny sizes, the CUDA tests skipping (automatic without a GPU; or
# ZSQ_GPU_CHECK_DRY=1; tests/test_gpu_check.py runs it):
#   bash benchmarks/gpu_check.sh /tmp/gpu_check
# .gpu_deps (git-ignored, pure-Python pytest and a static ninja; without ninja torch compiles the sources one
# by one): pip install --target .gpu_deps --no-deps pytest pluggy iniconfig packaging ninja
#
# Settings: ZSQ_GPU_CHECK_BUDGET seconds for the whole script (default 470: a step never runs past it, one with
# under 15 s left is skipped); ZSQ_GPU_CHECK_BUILD=0 reuses a built .so (carry it); ZSQ_GPU_CHECK_STEPS, a
# space-separated subset of the steps above (default all, in that order); DGH_ITERATIONS (default 20) the
# timed DGH steps, extrapolated to 1000; RECON_ITERATIONS (default 30) per BRECQ unit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pytest" 2> /dev/null && [ -d .gpu_deps ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_deps"; fi
if ! command -v ninja > /dev/null && [ -x .gpu_deps/bin/ninja ]; then export PATH="$PATH:$PWD/.gpu_deps/bin"; fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
DRY="${ZSQ_GPU_CHECK_DRY:-$([ "$CUDA" = 1 ] && echo 0 || echo 1)}"
BUILD="${ZSQ_GPU_CHECK_BUILD:-$([ "$DRY" = 1 ] && echo 0 || echo 1)}"
BUDGET="${ZSQ_GPU_CHECK_BUDGET:-470}"
STEPS=" ${ZSQ_GPU_CHECK_STEPS:-build smoke tests kernels dgh brecq memory sanitizer} "
status=0

step() {  # step NAME CAP_SECONDS LOGFILE CMD...: run under timeout (cap, or what the budget has left), log it
  local name="$1" cap="$2" log="$3"; shift 3
  [[ "$STEPS" == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.md"; status=1; return 1
  fi
  local limit=$((cap < left ? cap : left)) t0=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/summary.md"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   timed out after ${limit} s" | tee -a "$OUT/summary.md"
  echo "   exit $rc, $((SECONDS - t0)) s, log $log" | tee -a "$OUT/summary.md"
  [ $rc -eq 0 ] || status=1
  return $rc
}

: > "$OUT/summary.md"
"$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF'
import os, platform, shutil, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cpus", os.cpu_count(), "ninja", shutil.which("ninja"), "nvcc", shutil.which("nvcc"))
try:
    import pytest
    print("pytest", pytest.__version__)
except ImportError:
    print("pytest none")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("gpu none: a CPU rehearsal at tiny sizes")
PYEOF
tee -a "$OUT/summary.md" < "$OUT/env.txt"

if [ "$BUILD" = 1 ]; then
  # setup.py picks the local GPU's architecture when TORCH_CUDA_ARCH_LIST is unset
  step build 240 build.log env MAX_JOBS="$(nproc)" ZSQ_FAST_CUDA="${ZSQ_FAST_CUDA:-1}" "$PY" setup.py build_ext --inplace \
    || { echo "build failed: see $OUT/build.log"; tail -n 20 "$OUT/build.log"; exit 1; }
fi
"$PY" -c "import json, zsq_fast; print(json.dumps(zsq_fast.ops.backend()))" > "$OUT/backend.txt" 2>&1 || status=1
tee -a "$OUT/summary.md" < "$OUT/backend.txt"

DEV=$([ "$DRY" = 1 ] && echo cpu || echo cuda)
# every test of a file that has CUDA tests whose name says cuda (the parametrized [cuda] cases, cuda_only tests)
TEST_FILES=$(grep -l "cuda_only\|cuda.is_available" tests/test_*.py)
step smoke 60 smoke.log "$PY" benchmarks/cuda_smoke.py --device "$DEV"
step tests 150 tests.log "$PY" -m pytest -q -rs -p no:cacheprovider -k "cuda or device_memory" $TEST_FILES \
  --junitxml="$OUT/tests.xml"
if [ "$DRY" = 1 ]; then
  step kernels 60 kernels.log "$PY" benchmarks/bench_kernels.py --table --quick --repeat 1 \
    --nets resnet18,efficientnet_lite0 --out "$OUT/kernels.md"
  step dgh 60 dgh.log "$PY" benchmarks/speed.py --tiny --device cpu --parts e2e --e2e-runs exact:device,exact:host \
    --timeout 50 --out "$OUT/dgh.md"
  step brecq 60 brecq.log "$PY" benchmarks/speed.py --tiny --device cpu --parts reconstruction --recon-images 8 \
    --recon-iterations 2 --out "$OUT/brecq.md"
  step memory 60 memory.log "$PY" benchmarks/speed.py --tiny --device cpu --parts generation --gen-models resnet20 \
    --gen-n 16,64 --gen-modes exact --timeout 50 --out "$OUT/memory.md"
else
  step kernels 90 kernels.log "$PY" benchmarks/bench_kernels.py --table --repeat 5 \
    --nets resnet18,efficientnet_lite0 --out "$OUT/kernels.md"
  step dgh 150 dgh.log "$PY" benchmarks/speed.py --device cuda --parts e2e --e2e-runs exact:device,exact:host \
    --e2e-iterations "${DGH_ITERATIONS:-20}" --timeout 70 --out "$OUT/dgh.md"
  step brecq 120 brecq.log "$PY" benchmarks/speed.py --device cuda --parts reconstruction --recon-images 64 \
    --recon-iterations "${RECON_ITERATIONS:-30}" --out "$OUT/brecq.md"
  step memory 120 memory.log "$PY" benchmarks/speed.py --device cuda --parts generation --gen-models resnet20 \
    --gen-n 1024,16384 --gen-modes exact --iterations 3 --timeout 55 --out "$OUT/memory.md"
  if command -v compute-sanitizer > /dev/null; then
    step sanitizer 90 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$PY" benchmarks/cuda_smoke.py --device cuda
  fi
fi
[ -f "$OUT/tests.log" ] && tail -n 3 "$OUT/tests.log" >> "$OUT/summary.md"
for f in kernels.md dgh.md brecq.md memory.md; do
  [ -f "$OUT/$f" ] && { echo; echo "### $f"; cat "$OUT/$f"; } >> "$OUT/summary.md"
done
echo "gpu_check: exit $status after $SECONDS s, tables and logs in $OUT/"
exit $status
