#!/usr/bin/env bash
# Sample efficiency on the default task (claim 9): DPPO-Binary-TV/KL vs GRPO-ClipHigher with `dppo train` defaults
# (bundled arithmetic task, tiny Qwen3 with cached SFT warm-up, bf16 rollout, 32 prompts × 8, 4 minibatches),
# 3 seeds, 200 steps (the default job's length), held-out Avg@4 every 5 steps; steps until it reaches the target.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m dppo compare --runner dppo --methods dppo-binary-tv dppo-binary-kl grpo-clip-higher --seeds 0,1,2 \
  --jobs "${JOBS:-2}" --out runs/results/efficiency --title "Default task: DPPO vs GRPO-ClipHigher" \
  --metrics reward,eval/accuracy,loss/abs_diff_mean,loss/masked_frac,entropy --target "${TARGET:-eval/accuracy=0.65}" \
  -- --steps 200 --eval_every 5 --threads 1 --no-progress --no-tensorboard --no-plot
