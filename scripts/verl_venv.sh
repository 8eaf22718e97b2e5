#!/usr/bin/env bash
# Creates .venv-verl (if missing) for tests/integrations_verl: verl 0.9.1 in its own venv, because it pins
# transformers < 5.11 and brings ray, which clash with .venv. As in bootstrap.sh, torch is pinned to the CPU build
# first (where no CUDA GPU is present) and constrained afterwards; dppo itself goes in editable and without its
# dependencies, so that `import verl` finds dppo's `verl.plugins` entry point (pyproject.toml). verl needs Python < 3.13.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=".venv-verl"
py="$venv/bin/python"
stamp="$venv/.installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then
  exit 0
fi
if [ ! -x "$py" ]; then
  base=""
  for cand in python3.12 python3.11 python3.10 python3; do
    if "$cand" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] < (3, 13))' >/dev/null 2>&1; then
      base="$cand"; break
    fi
  done
  [ -n "$base" ] || { echo "verl 0.9.1 needs Python 3.10-3.12; none found" >&2; exit 1; }
  "$base" -m venv "$venv"
fi
pip_q=(-q --disable-pip-version-check --no-compile)  # no .pyc for 1.9 GB of packages: imports compile what they use
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install "${pip_q[@]}" torch
  else
    "$py" -m pip install "${pip_q[@]}" "torch==2.13.0"
  fi
fi
tv=$("$py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
echo "torch==$tv" > "$venv/constraints.txt"
"$py" -m pip install "${pip_q[@]}" -c "$venv/constraints.txt" "verl==0.9.1" "pytest>=8"
"$py" -m pip install "${pip_q[@]}" -c "$venv/constraints.txt" --no-deps -e .
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
touch "$stamp"
