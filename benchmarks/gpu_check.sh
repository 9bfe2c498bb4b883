#!/usr/bin/env bash
# One command for a bare GPU machine (torch preinstalled, no network, nothing else set up):
#   1. build zsq_fast._C in place with every core, for the local GPU's architecture;
#   2. every kernel once per layout/dtype/alignment case against the reference (cuda_smoke.py), under
#      compute-sanitizer memcheck when it is installed, then the whole test suite (CUDA variants included);
#   3. the kernel benchmark (ours vs PyTorch composites vs copy bandwidth, CUDA events);
#   4. the speed benchmark (generation vs N, BRECQ per block, ResNet-18 224 px end to end).
# Every log and table lands in one folder (default gpu_check_out/), summarised in summary.md.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   ZSQ_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT   # CPU dry run at tiny sizes (CI runs it)
#
# Reuse a .so built by an earlier call (it is gitignored: carry it) with ZSQ_GPU_CHECK_BUILD=0.
# A device call is limited in time (10 minutes): run the steps over several calls with ZSQ_GPU_CHECK_STEPS, a
# space-separated subset of "smoke sanitizer tests kernels speed" (default: all), and SPEED_PARTS, the parts of
# speed.py for this call (a comma list of generation,reconstruction,e2e; default all three), e.g.
#   call 1: bash benchmarks/gpu_check.sh OUT1                                   (build, then everything else
#           ZSQ_GPU_CHECK_STEPS="smoke sanitizer" limits it to the kernel smoke checks)
#   call 2: ZSQ_GPU_CHECK_BUILD=0 ZSQ_GPU_CHECK_STEPS="tests" bash benchmarks/gpu_check.sh OUT2
#   call 3: ZSQ_GPU_CHECK_BUILD=0 ZSQ_GPU_CHECK_STEPS="kernels speed" SPEED_PARTS=e2e bash benchmarks/gpu_check.sh OUT3
# E2E_ITERATIONS (default 100) sets the timed steps of the 1024-image ResNet-18 run; fewer than 1000
# are extrapolated to 1000 and labelled so in the table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
DRY="${ZSQ_GPU_CHECK_DRY:-0}"
BUILD="${ZSQ_GPU_CHECK_BUILD:-$([ "$DRY" = 1 ] && echo 0 || echo 1)}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
STEPS=" ${ZSQ_GPU_CHECK_STEPS:-smoke sanitizer tests kernels speed} "
step() {  # step NAME LOGFILE CMD...: run, log, record the exit code and time (only the steps in STEPS)
  local name="$1" log="$2"; shift 2
  case "$name" in build|backend) ;; *) [[ "$STEPS" == *" $name "* ]] || return 0 ;; esac
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/summary.md"
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  echo "   exit $rc, $((SECONDS - t0)) s, log $log" | tee -a "$OUT/summary.md"
  [ $rc -eq 0 ] || status=1
  return $rc
}

: > "$OUT/summary.md"
"$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF'
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cpus", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("gpu none")
PYEOF
cat "$OUT/env.txt" | tee -a "$OUT/summary.md"

if [ "$BUILD" = 1 ]; then
  # setup.py picks the local GPU's architecture when TORCH_CUDA_ARCH_LIST is unset
  step build build.log env MAX_JOBS="$(nproc)" ZSQ_FAST_CUDA="${ZSQ_FAST_CUDA:-1}" "$PY" setup.py build_ext --inplace \
    || { echo "build failed: see $OUT/build.log"; exit 1; }
fi
step backend backend.txt "$PY" -c "import json, zsq_fast; print(json.dumps(zsq_fast.ops.backend()))"

if [ "$DRY" = 1 ]; then
  step smoke smoke.log "$PY" benchmarks/cuda_smoke.py --device cpu
  step tests tests.log "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_library.py -k "schemas or meta_tensors"
  step kernels kernels.log "$PY" benchmarks/bench_kernels.py --table --quick --repeat 1 --out "$OUT/kernels.md"
  step speed speed.log "$PY" benchmarks/speed.py --tiny --device cpu --out "$OUT/speed.md"
else
  step smoke smoke.log "$PY" benchmarks/cuda_smoke.py --device cuda
  if command -v compute-sanitizer > /dev/null && [ "${ZSQ_GPU_CHECK_SANITIZE:-1}" = 1 ]; then
    step sanitizer sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$PY" benchmarks/cuda_smoke.py --device cuda
  fi
  step tests tests.log "$PY" -m pytest -q -p no:cacheprovider -ra tests --junitxml="$OUT/tests.xml"
  step kernels kernels.log "$PY" benchmarks/bench_kernels.py --table --out "$OUT/kernels.md"
  step speed speed.log "$PY" benchmarks/speed.py --device cuda --iterations 10 --recon-iterations 50 \
    --e2e-iterations "${E2E_ITERATIONS:-100}" --parts "${SPEED_PARTS:-generation,reconstruction,e2e}" \
    --out "$OUT/speed.md"
fi
[ -f "$OUT/tests.log" ] && tail -n 3 "$OUT/tests.log" >> "$OUT/summary.md"
for f in kernels.md speed.md; do
  [ -f "$OUT/$f" ] && { echo; echo "### $f"; cat "$OUT/$f"; } >> "$OUT/summary.md"
done
echo "gpu_check: exit $status, tables and logs in $OUT/"
exit $status
