#!/usr/bin/env bash
# One pass of the GPU checks on an NVIDIA machine, from the repository root:
#
#   bash bench/gpu_check.sh            # on the GPU machine (about 5 minutes on an H200 once
#                                      # installed; installing CUDA torch adds a few)
#   bash bench/gpu_check.sh --dry-run  # the same sequence on the CPU, tiny (or GPU_CHECK_CPU=1)
#
# Steps, in order of importance, each with its own time limit; the first one that fails
# (or runs out of time) stops the script with a non-zero exit, and what the steps before
# it wrote stays in the output folder:
#   1 venv     a virtual environment (--system-site-packages: a CUDA torch already on the
#              machine is reused)
#   2 torch    the CUDA build of torch, if torch there sees no GPU; the GPU must then be seen
#   3 install  the project with its cuda extra, and pytest (skipped if already importable)
#   4 info     nvidia-smi, the versions of torch / CUDA / transformers / peft / bitsandbytes
#   5 tests    python -m pytest -m gpu (on the CPU they all report skipped)
#   6 qlora    bench/torch_vs_hf_trainer.py: Gemma-3-1B shape, bf16, 4-bit QLoRA
#   7 lora     the same without quantization
#
# Output folder: $OUT if set, else ./gpu_check_out. It gets setup.log (steps 1-4),
# tests.log, bench_qlora.log/.json, bench_lora.log/.json and summary.txt (one line per
# step: name, status, seconds); 7 files, nothing nested. Built models and scratch files go
# to $GPU_CHECK_WORK (default /tmp/macft-gpu-check), not to the output folder.
#
# Settings (environment):
#   PYTHON                the Python that creates the venv (default python3)
#   GPU_CHECK_VENV        the venv (default .venv-gpu; in a dry run .venv when it exists);
#                         "none": use PYTHON itself, no venv (e.g. an image whose Python
#                         already has CUDA torch, where `python3 -m venv` is missing)
#   GPU_CHECK_TORCH       what pip installs when torch sees no GPU (default torch==2.13.0:
#                         the CUDA build on Linux x86_64 from PyPI)
#   GPU_CHECK_WHEELS      a folder of wheels, for a machine without PyPI: the missing
#                         dependencies are installed from it alone (no index) and the checkout
#                         runs in place (PYTHONPATH) instead of being installed (no build
#                         backend needed)
#   GPU_CHECK_LAYERS      layers of the Gemma-3-1B-shaped model (default 26, the real depth)
#   GPU_CHECK_STEPS       optimizer steps per benchmark arm (default 30; 5 of them warm-up)
#   GPU_CHECK_MAX_LENGTH  the Trainer arm's padded length (default 512)
#   GPU_CHECK_PEAK_TFLOPS the GPU's peak for MFU, if its name is not in the benchmark's table
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY=${GPU_CHECK_CPU:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$REPO/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/macft-gpu-check}
mkdir -p "$OUT_DIR" "$WORK" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)  # before the cd below: a relative $OUT is the caller's
cd "$REPO" || exit 1
: >"$OUT_DIR/summary.txt"
: >"$OUT_DIR/setup.log"

if [ "$DRY" = 1 ]; then
  # CPU: the same steps at a size that runs in a few minutes on 2 cores (bf16 is refused
  # there: macft computes in fp32 on the CPU)
  default_venv=.venv-gpu
  [ -x .venv/bin/python ] && default_venv=.venv
  VENV=${GPU_CHECK_VENV:-$default_venv}
  LAYERS=${GPU_CHECK_LAYERS:-1}
  STEPS=${GPU_CHECK_STEPS:-2}
  MAX_LENGTH=${GPU_CHECK_MAX_LENGTH:-128}
  PRECISION=fp32
else
  VENV=${GPU_CHECK_VENV:-.venv-gpu}
  LAYERS=${GPU_CHECK_LAYERS:-26}
  STEPS=${GPU_CHECK_STEPS:-30}
  MAX_LENGTH=${GPU_CHECK_MAX_LENGTH:-512}
  PRECISION=bf16
fi
if [ "$VENV" = none ]; then
  PY=$(command -v "${PYTHON:-python3}") || { echo "gpu_check.sh: ${PYTHON:-python3} not found" >&2; exit 1; }
else
  case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
  PY="$VENV/bin/python"
fi
export DRY VENV PY WORK REPO
export GPU_CHECK_TORCH=${GPU_CHECK_TORCH:-torch==2.13.0}
export GPU_CHECK_WHEELS=${GPU_CHECK_WHEELS:-}
# without an index the checkout is not installed but run in place
[ -n "$GPU_CHECK_WHEELS" ] && export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_PROGRESS_BAR=off

# --------------------------------------------------------------------------- the steps

pip_install() {
  if [ -n "$GPU_CHECK_WHEELS" ]; then
    "$PY" -m pip install --no-index --find-links "$GPU_CHECK_WHEELS" "$@"
  else
    "$PY" -m pip install "$@"
  fi
}

step_venv() {
  if [ "$VENV" != none ] && [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
    # A base Python that is itself a venv (images ship /opt/.../.venv/bin/python3):
    # --system-site-packages reaches only ITS base, so the packages it holds (a CUDA torch)
    # are added after the new venv's own through a .pth file
    local base_sites
    # (addsitedir: their own .pth files, editable installs among them, count too)
    base_sites=$("${PYTHON:-python3}" -c 'import site, sys
if sys.prefix != sys.base_prefix:
    print("\n".join(f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()))')
    if [ -n "$base_sites" ]; then
      echo "$base_sites" >"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_check_base.pth"
      echo "base Python is a venv: its site-packages follow this venv's: $base_sites"
    fi
  fi
  "$PY" -c 'import sys; print("python", sys.version.split()[0], "at", sys.executable)'
  "$PY" -m pip --version
}

step_torch() {
  local state
  state=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo missing)
  echo "torch: $state"
  if [ "$DRY" = 1 ]; then
    # CPU: any torch will do (no CUDA build is installed here)
    [ "$state" = missing ] && pip_install "$GPU_CHECK_TORCH"
  elif [ "$state" != cuda ]; then
    # --ignore-installed: a CPU build of the same version (in the venv or the system's
    # site-packages) would otherwise count as "already satisfied"
    pip_install --ignore-installed "$GPU_CHECK_TORCH"
  fi
  "$PY" - <<'EOF'
import os

import torch

cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU seen: {cuda}")
if not cuda and os.environ["DRY"] != "1":
    raise SystemExit("torch sees no GPU: check nvidia-smi and the driver (the CUDA build of torch "
                     "must not be newer than the driver supports)")
EOF
}

step_install() {
  # run from / so that the checkout itself (the current directory) does not count as installed
  if (cd / && "$PY" -) <<'EOF'
import importlib.util
import os
import sys

need = ["macft", "cuda_backend", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
        "platformdirs", "rouge_score", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
spec = importlib.util.find_spec("macft")
here = spec is not None and os.path.dirname(os.path.dirname(spec.origin)) == os.environ["REPO"]
print("missing:", ", ".join(missing) or "nothing", "| macft from this checkout:", here)
sys.exit(0 if not missing and here else 1)
EOF
  then
    echo "already installed: skipping pip"
  elif [ -n "$GPU_CHECK_WHEELS" ]; then
    local reqs
    mapfile -t reqs < <("$PY" -c 'import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["cuda"] + ["pytest"]))')
    pip_install "${reqs[@]}"
  else
    pip_install -e '.[cuda]' pytest
  fi
}

step_info() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md

import torch

for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
print(f"torch.version.cuda {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
}

step_tests() {
  "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider
}

step_bench() {  # quantize json
  local extra=()
  [ -n "${GPU_CHECK_PEAK_TFLOPS:-}" ] && extra=(--peak-tflops "$GPU_CHECK_PEAK_TFLOPS")
  "$PY" bench/torch_vs_hf_trainer.py --shape gemma3-1b --layers "$LAYERS" --steps "$STEPS" \
    --max-length "$MAX_LENGTH" --precision "$PRECISION" --quantize "$1" \
    --keep "$WORK/models" --json "$2" ${extra[@]+"${extra[@]}"}
}
export LAYERS STEPS MAX_LENGTH PRECISION
export -f pip_install step_venv step_torch step_install step_info step_tests step_bench

# run NAME LIMIT_S LOG COMMAND...: the command in its own `set -euo pipefail` shell with a time
# limit, its output shown and appended to LOG; the first failure ends the script
run() {
  local name=$1 limit=$2 log=$3 t0 rc
  shift 3
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    printf '%s\tok\t%ss\n' "$name" "$secs" >>"$OUT_DIR/summary.txt"
    return 0
  fi
  local why="exit $rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit}s"
  printf '%s\tFAILED (%s)\t%ss\n' "$name" "$why" "$secs" >>"$OUT_DIR/summary.txt"
  echo "!!! gpu_check: step '$name' FAILED ($why); log: $log; outputs so far: $OUT_DIR" >&2
  cat "$OUT_DIR/summary.txt" >&2
  exit 1
}

echo "gpu_check: $([ "$DRY" = 1 ] && echo "dry run on the CPU" || echo "GPU run"); venv $VENV; output $OUT_DIR"
run venv 300 "$OUT_DIR/setup.log" step_venv
run torch 900 "$OUT_DIR/setup.log" step_torch
run install 900 "$OUT_DIR/setup.log" step_install
run info 120 "$OUT_DIR/setup.log" step_info
run tests 420 "$OUT_DIR/tests.log" step_tests
# H200: the model is built once (~1 min) by the first benchmark and reused by the second
bench_limit=$([ "$DRY" = 1 ] && echo 900 || echo 360)
run qlora "$bench_limit" "$OUT_DIR/bench_qlora.log" step_bench 4bit "$OUT_DIR/bench_qlora.json"
run lora "$bench_limit" "$OUT_DIR/bench_lora.log" step_bench none "$OUT_DIR/bench_lora.json"

echo
echo "gpu_check: all steps passed; outputs in $OUT_DIR"
cat "$OUT_DIR/summary.txt"
for q in qlora lora; do
  echo
  echo "--- $q"
  sed -n '/^Machine:/,$p' "$OUT_DIR/bench_$q.log"
done
