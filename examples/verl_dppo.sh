#!/usr/bin/env bash
# DPPO with verl: verl's own trainer (python -m verl.trainer.main_ppo, GRPO advantages, vLLM rollout, FSDP actor)
# with dppo's Binary-TV trust region as its policy loss, anchored to the rollout's log-probs μ (bypass mode).
# Needs GPUs and one environment with verl 0.9.1 and dppo (pip install -e /path/to/dppo --no-deps after verl;
# `import verl` then registers dppo/<preset>). Data: verl's GSM8K preprocessing (examples/data_preprocess/gsm8k.py).
#
#   MODEL=Qwen/Qwen3-1.7B NGPUS=8 bash examples/verl_dppo.sh [more Hydra overrides, e.g. trainer.total_epochs=2]
#
# The three overrides that make μ the rollout's: bypass_mode=true (old_log_prob := the rollout's log-probs),
# calculate_log_probs=true (the rollout records them), and the rollout_correction link, which shows bypass mode to
# dppo's loss (it raises without it: in verl's default config old_log_prob is the recomputed π_old).
# clip_ratio_c=null keeps the preset's cap (∞ for DPPO); a number is used as the cap, as verl's own dppo_tv does.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3-1.7B}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
NGPUS=${NGPUS:-8}
PYTHON=${PYTHON:-python3}

overrides=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=false
  algorithm.rollout_correction.bypass_mode=true
  data.train_files="$TRAIN_FILE"
  data.val_files="$VAL_FILE"
  data.train_batch_size=256
  data.max_prompt_length=512
  data.max_response_length=2048
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
  actor_rollout_ref.actor.use_kl_loss=false
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.policy_loss.loss_mode=dppo/dppo-binary-tv
  '++actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}'
  actor_rollout_ref.actor.clip_ratio_low=0.15
  actor_rollout_ref.actor.clip_ratio_high=0.15
  actor_rollout_ref.actor.clip_ratio_c=null
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.n=8
  actor_rollout_ref.rollout.temperature=1.0
  actor_rollout_ref.rollout.calculate_log_probs=true
  actor_rollout_ref.rollout.tensor_model_parallel_size=1
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8
  trainer.use_v1=true
  trainer.n_gpus_per_node="$NGPUS"
  trainer.nnodes=1
  trainer.project_name=dppo
  trainer.experiment_name=dppo-binary-tv
  trainer.logger='["console"]'
  trainer.total_epochs=1
)

# dppo's check of the composed config (verl's own config files), before Ray starts: it raises where μ would not be
# the rollout's and prints what it warns about
"$PYTHON" -m dppo.integrations.verl "${overrides[@]}" "$@"
exec "$PYTHON" -m verl.trainer.main_ppo "${overrides[@]}" "$@"
