#!/usr/bin/env bash
# The GPU checks, as one prepared script for a short loan of a CUDA machine (python3 with torch + transformers there;
# tyro, liger-kernel and their needs carried as wheels in .whl/, the default job's warm-up model in .devmodel/):
#   1. token statistics + policy loss on CUDA with Liger-Kernel as the peer (benchmarks/token_stats_cuda.py)
#   2. `dppo train --device cuda` on the default job (the warm-up model loaded with --model), 10 steps
#   3. the same through torchrun (NCCL, FSDP2), 1 process, 3 steps
#   4. a 1.5B-shaped model's training-step memory against the README's arithmetic (benchmarks/gpu_memory.py)
#   5. the CUDA tests (tests/test_token_stats.py, tests/test_fused.py: -k cuda)
#   6. the HF engine's rollout throughput on CUDA (benchmarks/rollout_throughput.py --device cuda --engines hf)
# Usage: OUT=dir bash benchmarks/cuda_check.sh      (a few minutes on an H100/H200; each part has its own timeout)
set -uo pipefail
OUT=${OUT:-runs/cuda_check}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
MODEL=${MODEL:-.devmodel}
part() {  # part NAME TIMEOUT_S CMD...: runs CMD, its output appended to the log, with its exit status and time
  local name=$1 t=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local s; s=$(date +%s.%N)
  timeout "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $(python3 -c "import time; print(round(time.time() - $s, 1))") s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >> "$LOG" 2>&1
part token_stats 180 python3 benchmarks/token_stats_cuda.py --out "$OUT/token_stats_cuda.json"
part train 90 python3 -m dppo train --device cuda --model "$MODEL" --steps 10 --out /tmp/run_cuda --no-progress \
  --no-plot
cp /tmp/run_cuda/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
part torchrun 75 torchrun --standalone --nproc_per_node 1 -m dppo train --device cuda --model "$MODEL" --steps 3 \
  --out /tmp/run_torchrun --no-progress --no-plot
cp /tmp/run_torchrun/metrics.jsonl "$OUT/torchrun_metrics.jsonl" 2>/dev/null
part gpu_memory 100 python3 benchmarks/gpu_memory.py --out "$OUT/gpu_memory.json"
part pytest 60 python3 -m pytest -q -p no:cacheprovider tests/test_token_stats.py tests/test_fused.py -k cuda
part rollout 80 python3 benchmarks/rollout_throughput.py --device cuda --engines hf
cp benchmarks/results/rollout_throughput_cuda.json "$OUT/" 2>/dev/null
tail -c 3000 "$LOG"
