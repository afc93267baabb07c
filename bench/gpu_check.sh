#!/usr/bin/env bash
# The GPU rows, measured (bench/gpu_check.py), on a GPU box as it comes:
#   bash bench/gpu_check.sh [--quick | --dry-run] [OUT_DIR]      # ~8 min (--quick ~3) on an H100
# Two kinds of box, told apart by what is installed:
#  - a torch that already sees the GPU (a cluster node behind a firewall, no package registry):
#    that torch is used as it is, from this checkout without installing; a missing pure-Python
#    package (numpy, tqdm, grpcio, protobuf) comes from the wheels folder $BPFREE_WHEELS
#    (default: ../bpfree-wheels beside the checkout) into a private folder;
#  - anything else (a fresh box with a registry): its own venv (.gpu-venv) with a CUDA build of
#    torch and this project installed (pip install -e .).
# --dry-run runs every row on the CPU at toy sizes (what CI checks). On a GPU, tests/test_gpu.py runs
# first (OUT_DIR/gpu_tests.txt). Results are written after every row, with the GPU, driver, CUDA,
# torch and commit; a row that fails is recorded and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "bench/gpu_check.sh: $*" >&2; }
mode=(); out="bench/results"
for arg in "$@"; do
  case "$arg" in --quick|--dry-run) mode+=("$arg") ;; -*) say "unknown option $arg"; exit 2 ;; *) out="$arg" ;; esac
done
dry=false; [[ " ${mode[*]} " == *" --dry-run "* ]] && dry=true
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || { say "needs Python >= 3.11 (tomllib); $py is $("$py" -V 2>&1)"; exit 1; }
if ! $dry && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; }; then
  say "this machine has no CUDA GPU (nvidia-smi finds none); run it on one that has, or try --dry-run."
  exit 1
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
if "$py" -c 'import sys, torch; sys.exit(not (torch.cuda.is_available() or "--dry-run" in sys.argv))' \
    "${mode[@]}" 2>/dev/null; then
  # Use this torch as it is; run from the checkout; bring only what is missing, from wheels.
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  missing=$("$py" -c 'import importlib.util as u
print(" ".join(p for m, p in (("numpy", "numpy"), ("tqdm", "tqdm"), ("grpc", "grpcio"),
               ("google.protobuf", "protobuf")) if u.find_spec(m) is None))')
  if [ -n "$missing" ]; then
    wheels="${BPFREE_WHEELS:-../bpfree-wheels}"
    [ -d "$wheels" ] || { say "missing $missing and no wheels folder $wheels (set BPFREE_WHEELS)"; exit 1; }
    site="$(mktemp -d /tmp/bpfree-site.XXXXXX)"; trap 'rm -rf "$site"' EXIT
    "$py" -m pip install -q --no-index --find-links "$wheels" --target "$site" $missing \
      || { say "could not install $missing from $wheels"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
else
  venv=".gpu-venv"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.13.0     # PyPI's Linux wheel is a CUDA build
  "$venv/bin/python" -m pip install -q torch==2.13.0 -e .
  py="$venv/bin/python"
  "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    || { say "the CUDA build of torch in $venv sees no GPU (driver too old for it?); see nvidia-smi"; exit 1; }
fi
mkdir -p "$out"
if ! $dry && "$py" -c 'import pytest' 2>/dev/null; then   # first: the GPU tests, for real
  "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" \
    || say "some GPU tests failed (see $out/gpu_tests.txt); measuring anyway"
fi
"$py" -m bpfree.bench.gpu_check "${mode[@]}" --out "$out"
