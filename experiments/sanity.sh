#!/usr/bin/env bash
# Sanity test in miniature (paper §5.1; claims 4, 7): bf16 rollout, fp32 training, 4 gradient steps per batch,
# a fixed set of 64 problems, 3 seeds. Two settings: "paper-like" (Adam lr 1e-4) and "stress" (lr 1e-3, 8 gradient
# steps per batch, rollout-logit noise σ = 0.5 on top of bf16 → a ~10× larger mismatch).
# Also the anchor (claim 5), minimal negative mask (claim 6) and relax-low/high/both (claim 8) methods in the stress
# setting, where a trust region has something to do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
SANITY="pg-is cispo@ratio_cap=3 grpo-clip-higher minirl dppo-binary-tv dppo-binary-kl dppo-topk-tv dppo-topk-kl"
EXTRA="dppo-binary-kl-recompute minimal-negative-mask relax-low relax-high relax-both"
case "${1:-all}" in
  paper|all)
    $PY -m dppo compare --runner minilab --methods $SANITY --seeds 0,1,2 --jobs "$JOBS" \
      --out runs/results/sanity --title "Sanity test in miniature: bf16 rollout, lr 1e-4, 4 steps/batch" \
      --target heldout_acc=0.9 -- --steps 80 --lr 1e-4 --grad-steps 4 --rollout-dtype bf16 ;;&
  stress|all)
    $PY -m dppo compare --runner minilab --methods $SANITY $EXTRA --seeds 0,1,2 --jobs "$JOBS" \
      --out runs/results/stress --title "Stress: bf16 + logit noise 0.5 rollout, lr 1e-3, 8 steps/batch" \
      -- --steps 40 --lr 1e-3 --grad-steps 8 --rollout-dtype bf16 --rollout-noise 0.5 ;;
esac
