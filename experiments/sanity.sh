#!/usr/bin/env bash
# Sanity test in miniature (paper §5.1; claims 4, 5, 6, 7, 8, 9) on the shipped trainer: `dppo compare` runs
# `dppo train --config experiments/miniature.toml` (3-digit addition written out step by step, ~26 response tokens,
# a 2,048-id vocabulary with a long tail, a fixed set of 128 problems the warm-up model already solves greedily,
# bf16 rollout vs fp32 training, 4 updates per batch) once per method and seed. Each seed has its own warm-up model
# (the seed seeds the warm-up). Settings:
#   paper   lr 3e-5, the miniature as committed
#   stress  the same with lr STRESS_LR (default 1e-4, where the probe saw PG-IS collapse) for STRESS_STEPS (60) steps,
#           optionally Gaussian noise σ = STRESS_NOISE on the engine's logits (--rollout_logit_noise; default 0)
#   extra   the anchor / minimal-mask / relax ablations (claims 5, 6, 8) in the stress setting
#   probe   PG-IS and DPPO-Binary-TV, seed 0, 60 steps, at a few stress levels PROBE="lr:noise ..." (how the stress
#           setting was chosen)
#   control the stress setting with an fp32 rollout engine (no mismatch): whether a collapse needs the mismatch
# Reports: runs/results/<setting>/report.md (command, machine, wall time, table, curves).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-0,1,2}
MINI=(--config experiments/miniature.toml --no-progress --no-tensorboard --no-plot)
METHODS="pg-is cispo grpo-clip-higher minirl dppo-binary-tv dppo-binary-kl dppo-topk-tv dppo-topk-kl ipo icepop vaco"
EXTRA="dppo-binary-kl-recompute minimal-negative-mask relax-low relax-high relax-both"
METRICS=reward,eval/accuracy,eval/greedy_accuracy,mismatch/abs_diff_mean,loss/abs_diff_mean,loss/masked_frac,entropy
STRESS=(--rollout_logit_noise "${STRESS_NOISE:-0}" --lr "${STRESS_LR:-1e-4}" --steps "${STRESS_STEPS:-60}"
        --eval_every 20)
case "${1:-paper}" in
  paper)
    $PY -m dppo compare --methods $METHODS --seeds "$SEEDS" --jobs "$JOBS" --out runs/results/sanity \
      --title "Sanity test in miniature: bf16 rollout, lr 3e-5, 4 updates/batch" --metrics "$METRICS" \
      --target reward=0.9 -- "${MINI[@]}" ;;
  stress)
    $PY -m dppo compare --methods $METHODS --seeds "$SEEDS" --jobs "$JOBS" --out runs/results/stress \
      --title "Stress: bf16 + logit noise ${STRESS_NOISE:-0}, lr ${STRESS_LR:-1e-4}, 4 updates/batch" \
      --metrics "$METRICS" --target reward=0.9 -- "${MINI[@]}" "${STRESS[@]}" ;;
  extra)
    $PY -m dppo compare --methods $METHODS $EXTRA --seeds "$SEEDS" \
      --jobs "$JOBS" --out runs/results/stress \
      --title "Stress: bf16 + logit noise ${STRESS_NOISE:-0}, lr ${STRESS_LR:-1e-4}, 4 updates/batch; with ablations" \
      --metrics "$METRICS" --target reward=0.9 -- "${MINI[@]}" "${STRESS[@]}" ;;
  probe)
    for setting in ${PROBE:-1e-4:0 5e-5:0 3e-5:0.5 5e-5:1.0}; do
      lr=${setting%%:*}; noise=${setting##*:}
      $PY -m dppo compare --methods pg-is dppo-binary-tv --seeds 0 --jobs "$JOBS" \
        --out "runs/results/probe/lr${lr}-noise${noise}" --title "Probe: lr $lr, logit noise $noise" \
        --metrics "$METRICS" -- "${MINI[@]}" --lr "$lr" --rollout_logit_noise "$noise" --steps "${PROBE_STEPS:-60}" \
        --eval_every 0
    done ;;
  control)
    # the stress setting with an fp32 rollout engine (no training–inference mismatch at all): is a collapse the
    # mismatch's, or the step size's?
    $PY -m dppo compare --methods pg-is grpo-clip-higher dppo-binary-tv --seeds "$SEEDS" --jobs "$JOBS" \
      --out runs/results/control --title "Control: the stress setting with an fp32 rollout (no mismatch)" \
      --metrics "$METRICS" --target reward=0.9 -- "${MINI[@]}" "${STRESS[@]}" --rollout_dtype fp32 ;;
  *) echo "usage: $0 {paper|stress|extra|probe|control}" >&2; exit 2 ;;
esac
