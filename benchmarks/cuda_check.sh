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
# and, on its own (PARTS=vllm), issue 21's check of the vLLM engine on CUDA (~8 min on an H200; vllm installed there,
# else every vllm part is skipped with a message):
#   vllm_pytest   the vLLM engine's tests with its CUDA build (log μ against the HF forward, weight sync, sleep refusal)
#   vllm_sleep0/1/2  benchmarks/vllm_gpu_phases.py: a Qwen2.5-1.5B-shaped model (random weights, built there), 4 steps
#                 of 64 x 8 responses through dppo's Trainer with --engine vllm, device memory per phase (start-up,
#                 sync, generate, asleep, train) with --vllm_sleep 0, 1 and 2
#   vllm_torchrun1  `torchrun --nproc_per_node 1 -m dppo train --engine vllm` on the default job's model: the engine
#                 joined to the process group (external_launcher), sleep level 2 by default, the final export after it
#   vllm_torchrun2  the phases benchmark under torchrun with 2 GPUs (skipped with a message on a 1-GPU machine)
# Usage: OUT=dir bash benchmarks/cuda_check.sh      (a few minutes on an H100/H200; each part has its own timeout)
#        OUT=dir PARTS=tiles bash benchmarks/cuda_check.sh        (PARTS: comma-separated part names, "tiles", "vllm")
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
[ "$PARTS" = vllm ] && PARTS=vllm_pytest,vllm_sleep0,vllm_sleep1,vllm_sleep2,vllm_torchrun1,vllm_torchrun2
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
# issue 21: vLLM on CUDA, sleep mode, torchrun (skipped with a message where vllm is absent or GPUs are too few)
if [[ ",$PARTS," == *",vllm_"* ]]; then
  if python3 -c "import vllm" >> "$LOG" 2>&1; then
    python3 -c "import vllm; print('vllm', vllm.__version__)" >> "$LOG" 2>&1
    part vllm_pytest 240 python3 -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py tests/test_vllm_sleep.py
    for lvl in 0 1 2; do
      part "vllm_sleep$lvl" 200 python3 benchmarks/vllm_gpu_phases.py --build 1.5b --out "$OUT/vllm_phases_sleep$lvl.json" \
        -- --device cuda --engine vllm --vllm_sleep "$lvl"
    done
    part vllm_torchrun1 150 torchrun --standalone --nproc_per_node 1 -m dppo train --device cuda --engine vllm \
      --model "$MODEL" --steps 3 --out /tmp/run_vllm_torchrun --no-progress --no-plot
    want vllm_torchrun1 && cp /tmp/run_vllm_torchrun/metrics.jsonl "$OUT/vllm_torchrun_metrics.jsonl" 2>/dev/null \
      && ls /tmp/run_vllm_torchrun/final >> "$LOG" 2>&1
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      part vllm_torchrun2 240 torchrun --standalone --nproc_per_node 2 benchmarks/vllm_gpu_phases.py --build 1.5b \
        --out "$OUT/vllm_phases_2gpu.json" -- --device cuda --engine vllm
    elif want vllm_torchrun2; then
      echo "=== vllm_torchrun2: skipped: one GPU visible, 2 needed" | tee -a "$LOG"
    fi
  else
    echo "=== vllm parts: skipped: vllm is not installed here (pip install vllm==0.32.0 to run them)" | tee -a "$LOG"
  fi
fi
tail -c 3000 "$LOG"
