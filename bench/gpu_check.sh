#!/usr/bin/env bash
# GPU rows, measured (bench/gpu_check.py): run from a clean checkout on a machine with a CUDA GPU.
#   bash bench/gpu_check.sh [OUT_DIR]     # ~5 min; writes OUT_DIR/gpu_check.{md,json} (bench/results)
# On a machine without one it stops at once with one sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "bench/gpu_check.sh: this machine has no CUDA GPU (nvidia-smi finds none); run it on one that has." >&2
  exit 1
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  python3 -m pip install -q torch==2.13.0          # PyPI's Linux wheel is the CUDA build
fi
python3 -c "import bpfree" 2>/dev/null || python3 -m pip install -q torch==2.13.0 -e .
exec python3 -m bpfree.bench.gpu_check --out "$out"
