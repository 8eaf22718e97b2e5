#!/usr/bin/env bash
# Sample efficiency on the default task (claim 9): DPPO-Binary-TV/KL vs GRPO-ClipHigher with `dppo train` defaults
# (bundled arithmetic task, tiny Qwen3 with cached SFT warm-up, bf16 rollout, 32 prompts × 8, 4 minibatches),
# 3 seeds, 60 steps; steps until held-out accuracy reaches the target.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m dppo compare --runner dppo --methods dppo-binary-tv dppo-binary-kl grpo-clip-higher --seeds 0,1,2 \
  --jobs "${JOBS:-2}" --out runs/results/efficiency --title "Default task: DPPO vs GRPO-ClipHigher" \
  --metrics reward,eval/accuracy,loss/abs_diff_mean,loss/masked_frac,entropy --target "${TARGET:-eval/accuracy=0.2}" \
  -- --steps 60 --threads 1 --no-progress --no-tensorboard --no-plot
