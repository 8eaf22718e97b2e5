#!/usr/bin/env bash
# The GPU checks, as one prepared script for a short loan of a CUDA machine (python3 with torch + transformers there;
# tyro, liger-kernel and their needs carried as wheels in .whl/, the default job's warm-up model in .devmodel/):
#   1. token statistics + policy loss on CUDA with Liger-Kernel as the peer (benchmarks/token_stats_cuda.py)
#   2. `dppo train --device cuda` on the default job (the warm-up model loaded with --model), 10 steps
#   3. the same through torchrun (NCCL, FSDP2), 1 process, 3 steps
#   4. a 1.5B-shaped model's training-step memory against the README's arithmetic (benchmarks/gpu_memory.py)
#   5. the CUDA tests (tests/test_token_stats.py, tests/test_fused.py: -k cuda)
#   6. the HF engine's rollout throughput on CUDA (benchmarks/rollout_throughput.py --device cuda --engines hf)
# and, on its own (PARTS=tiles), issue 24's check of the fused loss's Triton tile kernels (~6 min on an H200):
#   tiles_pytest  the kernels' tests compiled on the GPU (tests/test_triton_tiles.py) and the fused path's CUDA test
#   tiles_bench   benchmarks/token_stats_cuda.py: kernel sweep, then naive / fused (Triton) / fused (PyTorch tiles) /
#                 GEMMs alone / Liger at H 1536 and 4096, N 1k-64k, fp32 and bf16, reported against the goals
# Usage: OUT=dir bash benchmarks/cuda_check.sh      (a few minutes on an H100/H200; each part has its own timeout)
#        OUT=dir PARTS=tiles bash benchmarks/cuda_check.sh        (PARTS: comma-separated part names, or "tiles")
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
PARTS=${PARTS:-token_stats,train,torchrun,gpu_memory,pytest,rollout}
[ "$PARTS" = tiles ] && PARTS=tiles_pytest,tiles_bench
want() { [[ ",$PARTS," == *",$1,"* ]]; }
part() {  # part NAME TIMEOUT_S CMD...: runs CMD, its output appended to the log, with its exit status and time
  local name=$1 t=$2; shift 2
  want "$name" || return 0
  echo "=== $name: $*" | tee -a "$LOG"
  local s; s=$(date +%s.%N)
  timeout "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $(python3 -c "import time; print(round(time.time() - $s, 1))") s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)"
} >> "$LOG" 2>&1
part token_stats 180 python3 benchmarks/token_stats_cuda.py --hs 1536 --out "$OUT/token_stats_cuda.json"
part train 90 python3 -m dppo train --device cuda --model "$MODEL" --steps 10 --out /tmp/run_cuda --no-progress \
  --no-plot
want train && cp /tmp/run_cuda/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
part torchrun 75 torchrun --standalone --nproc_per_node 1 -m dppo train --device cuda --model "$MODEL" --steps 3 \
  --out /tmp/run_torchrun --no-progress --no-plot
want torchrun && cp /tmp/run_torchrun/metrics.jsonl "$OUT/torchrun_metrics.jsonl" 2>/dev/null
part gpu_memory 100 python3 benchmarks/gpu_memory.py --out "$OUT/gpu_memory.json"
part pytest 60 python3 -m pytest -q -p no:cacheprovider tests/test_token_stats.py tests/test_fused.py -k cuda
part tiles_pytest 150 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_triton_tiles.py \
  tests/test_fused.py::test_cuda_matches_cpu
part tiles_bench 420 python3 benchmarks/token_stats_cuda.py --sweep bf16 --profile 1536:bf16:16384 \
  --out "$OUT/token_stats_cuda_triton.json"
# a timeout leaves the rows measured so far: their report
want tiles_bench && [ ! -f "$OUT/token_stats_cuda_triton.json" ] && [ -f "$OUT/token_stats_cuda_triton.json.partial" ] \
  && python3 benchmarks/token_stats_cuda.py --report "$OUT/token_stats_cuda_triton.json.partial" >> "$LOG" 2>&1
part rollout 80 python3 benchmarks/rollout_throughput.py --device cuda --engines hf
want rollout && cp benchmarks/results/rollout_throughput_cuda.json "$OUT/" 2>/dev/null
tail -c 3000 "$LOG"
