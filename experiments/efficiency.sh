#!/usr/bin/env bash
# Sample efficiency on the default job (claim 9): DPPO-Binary-TV/KL vs GRPO-ClipHigher with `dppo train` as shipped
# (bundled arithmetic task, tiny Qwen3 after its cached SFT warm-up, bf16 rollout, 32 prompts × 8, 4 mini-batch
# updates), 3 seeds (each seed also seeds the warm-up, so each starts from its own model), 200 steps (the default
# job's length), held-out Avg@4 every 5 steps; steps until the held-out accuracy reaches the target.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m dppo compare --methods dppo-binary-tv dppo-binary-kl grpo-clip-higher --seeds 0,1,2 \
  --jobs "${JOBS:-2}" --out runs/results/efficiency --title "Default task: DPPO vs GRPO-ClipHigher" \
  --metrics reward,eval/accuracy,mismatch/abs_diff_mean,loss/masked_frac,entropy \
  --target "${TARGET:-eval/accuracy=0.65}" \
  -- --steps 200 --eval_every 5 --threads 1 --no-progress --no-tensorboard --no-plot
