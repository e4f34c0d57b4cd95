#!/usr/bin/env bash
# One prepared GPU check (issue 12, part 5), meant to use a lent GPU in one call:
#   1. build medge for this GPU's compute capability only (minutes, not the release's ten targets),
#   2. the kernel bandwidth benchmark (tools/bench_preprocess.py --gpu-only: kernel vs copy vs PyTorch),
#   3. the gpu tests with MEDGE_EXPECT_GPU=1 (a skipped gpu test fails) and the kernel emulation tests,
#   4. tools/bench_latency.py on the demo bundle for what runs here (CUDA preprocessing into device
#      buffers; ONNX Runtime's CUDA provider if installed; TensorRT where it exists),
# and writes everything under one folder: summary.md plus gpu_check.tar.gz (every log, JSON, table),
# two files, so that it fits what a device call brings back. Each stage has a time limit; the whole
# stays under 8 minutes on an H200. Exit status: 0 when every stage passed, 1 when one failed,
# 2 when there is no usable GPU (nothing else is attempted: this check never passes without a GPU).
# Stages that would run past the check's deadline (MEDGE_GPU_CHECK_DEADLINE, default 450 s) are cut
# short or skipped, and say so.
#
# Usage: tools/gpu_check.sh [OUTDIR]          (default: $OUT when set, else ./gpu_check_out)
# What the GPU host lacks (pydicom) travels as wheels: here, bash ../shared/gpu-host/pack.sh .gpuhost,
# then carry .gpuhost with the call; this script installs it (eval "$(bash .gpuhost/a/setup.sh)").
# Knobs: MEDGE_GPU_CHECK_SKIP_BUILD=1 (use the medge already installed), PYTHON (default python3),
# MEDGE_GPU_CHECK_CONTINUE=1 (run every stage even when medge sees no GPU: dry runs of this script).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/medge-gpu-check.XXXXXX")
py=${PYTHON:-python3}
started=$(date +%s)
summary="$out/summary.md"
status=0
declare -a rows=()

deadline=$((started + ${MEDGE_GPU_CHECK_DEADLINE:-450}))  # the whole check, packing included: 7.5 minutes

stage() {  # stage NAME LIMIT_S COMMAND...: runs with a time limit, log in $work/NAME.log, one summary row
  local name=$1 limit=$2
  shift 2
  local t0 rc left
  t0=$(date +%s)
  left=$((deadline - t0 - 15))  # keep 15 s to write the summary and the tarball
  if [ "$left" -lt 20 ]; then
    rows+=("| $name | SKIPPED: the check's time ran out | 0s | - |")
    status=1
    echo "== $name: skipped, the check's time ran out" | tee -a "$work/gpu_check.log"
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$work/gpu_check.log"
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  local verdict=passed
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT after ${limit}s"; status=1
  elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; status=1
  fi
  rows+=("| $name | $verdict | ${took}s | $name.log |")
  echo "   $verdict in ${took}s" | tee -a "$work/gpu_check.log"
  tail -n 5 "$work/$name.log" | sed 's/^/   | /' | tee -a "$work/gpu_check.log"
  return $rc
}

finish() {
  local total=$(($(date +%s) - started))
  {
    echo "# medge GPU check"
    echo
    echo "- when: $(date -u +%Y-%m-%dT%H:%M:%SZ), $total s in all"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- GPU: ${gpu_name:-none}, compute capability ${cc_dot:-?}, driver ${driver:-?}"
    echo "- result: $([ $status -eq 0 ] && echo 'every stage passed' || echo 'SOME STAGE FAILED (see below)')"
    echo
    echo "| stage | result | time | log (in gpu_check.tar.gz) |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${rows[@]}"
    for f in bench_preprocess.md latency/latency.md; do
      if [ -f "$work/$f" ]; then echo; echo "## $f"; echo; cat "$work/$f"; fi
    done
    if [ -f "$work/pytest_gpu.log" ]; then
      echo; echo "## gpu tests (last lines)"; echo; echo '```'; tail -n 25 "$work/pytest_gpu.log"; echo '```'
    fi
  } >"$summary"
  tar -czf "$out/gpu_check.tar.gz" -C "$work" . 2>/dev/null
  cat "$summary"
  rm -rf "$work"
}

# 0. A GPU, or nothing. ---------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$work/nvidia-smi.log" 2>&1; then
  command -v nvidia-smi >/dev/null 2>&1 || echo "nvidia-smi not found on PATH" >"$work/nvidia-smi.log"
  echo "gpu_check: FAIL: no usable NVIDIA GPU here ($(head -n 1 "$work/nvidia-smi.log")); a GPU check cannot pass without one" >&2
  rows+=("| gpu | FAILED: no NVIDIA GPU / driver (nvidia-smi) | 0s | nvidia-smi.log |")
  status=2
  finish
  exit 2
fi
nvidia-smi >>"$work/nvidia-smi.log" 2>&1
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
cc_dot=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
cc=${cc_dot/./}
echo "gpu_check: $gpu_name, compute capability $cc_dot, driver $driver; output in $out"

# 1. What the host lacks, then the build for this GPU only. ----------------------------------------
if [ -f .gpuhost/a/setup.sh ]; then
  if exports=$(bash .gpuhost/a/setup.sh 2>"$work/gpuhost_setup.log"); then eval "$exports"; else
    echo "gpu_check: .gpuhost/a/setup.sh failed (see gpuhost_setup.log); going on without it" >&2
  fi
fi
{
  "$py" -V; "$py" -m pip list 2>/dev/null | grep -i -E '^(torch|cupy|cuda|onnx|tensorrt|numpy|pydicom|scikit|pybind)'
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$work/environment.log" 2>&1
if [ "${MEDGE_GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
  stage build 240 "$py" -m pip install --no-build-isolation --no-deps -e . \
    -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$cc" -C build-dir=build/gpu-check-sm$cc \
    || { echo "gpu_check: the build failed; nothing else can run" >&2; finish; exit 1; }
fi
stage cuda_available 60 "$py" -c "
import medge, medge._C as c
print('medge', medge.__version__, '| architectures:', c.cuda_architectures(), '| status:', c.cuda_status())
assert c.cuda_compiled(), 'this build has no CUDA kernels'
assert medge.cuda_available(), 'medge sees no usable CUDA device: ' + c.cuda_status()
" || [ "${MEDGE_GPU_CHECK_CONTINUE:-0}" = 1 ] || { finish; exit 1; }

# 2. Kernel bandwidth first (what a lent GPU is for): kernel vs device-to-device copy vs PyTorch ops.
stage bench_preprocess 90 "$py" tools/bench_preprocess.py --gpu-only --repeat 200 --warmup 20 \
  --json "$work/bench_preprocess.json" --markdown "$work/bench_preprocess.md"

# 3. Tests: every gpu test (a skip is a failure), and the kernels' CPU emulation for comparison. ---
stage pytest_gpu 180 env MEDGE_EXPECT_GPU=1 "$py" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$work/pytest_gpu.xml" tests
stage pytest_emulation 60 "$py" -m pytest -q -p no:cacheprovider tests/test_kernel_emulation.py \
  tests/test_preprocess_cuda_ordering.py

# 4. End-to-end latency on the demo bundle (CUDA preprocessing; ORT CUDA / TensorRT where present). --
if stage demo_bundle 60 "$py" -c "
from pathlib import Path
from medge.convert.demo import convert_demo
convert_demo(Path('$work/demo.medge'), log=print)
"; then
  stage bench_latency 90 "$py" tools/bench_latency.py "$work/demo.medge" --out "$work/latency" \
    --batch 1 8 --seconds 4 --rounds 2 --warmup 10 --images 32 --no-batcher
fi
rm -rf "$work/demo.medge"

finish
exit $status
