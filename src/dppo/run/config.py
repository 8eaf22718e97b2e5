"""The training configuration: one typed dataclass, every field with its default, help text and (where the value
comes from the paper) a citation of arXiv 2602.04879. ``dppo train --help`` prints exactly this.

:func:`validate` rejects a bad configuration before any model is built, naming the option and what to change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from dppo.methods import PRESETS

__all__ = ["TrainConfig", "validate", "ConfigError", "load_config", "save_config", "RESUME_MAY_CHANGE"]


def opt(default, help: str, choices: tuple | None = None):  # noqa: A002
    """A config field with CLI help (and optional choices)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # ---- run ------------------------------------------------------------------------------------------------
    out: str = opt("runs/default", "run directory (config.json, metrics.jsonl, TensorBoard events, checkpoint/); "
                   "starting again on a directory with a checkpoint resumes the run")
    seed: int = opt(0, "seed of everything: model init, warm-up data, prompts of every step, sampling")
    steps: int = opt(200, "RL steps (one rollout batch each)")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:1, …")
    threads: int = opt(0, "torch CPU threads (0 = auto: 1 for the built-in tiny model, whose matrices are too small "
                       "to gain from more and which slows down badly on a busy machine; torch's default otherwise)")
    # ---- model --------------------------------------------------------------------------------------------
    model: str = opt("", "local directory of a transformers causal LM + tokenizer (e.g. a downloaded "
                     "Qwen2.5-Math-1.5B); empty = the built-in tiny model with a supervised warm-up (default job)")
    arch: str = opt("qwen3", "tiny model: architecture", ("qwen3", "qwen2", "llama"))
    hidden: int = opt(128, "tiny model: hidden size")
    layers: int = opt(3, "tiny model: transformer layers")
    heads: int = opt(4, "tiny model: attention heads (2 KV heads)")
    warmup_steps: int = opt(1500, "tiny model: supervised warm-up steps before RL, so RL starts from a policy that "
                            "sometimes succeeds (cached: a second run with the same settings skips it)")
    warmup_lr: float = opt(3e-3, "tiny model: warm-up learning rate (AdamW, cosine)")
    warmup_batch: int = opt(64, "tiny model: warm-up batch size")
    warmup_noise: float = opt(0.5, "tiny model: the warm-up imitates a sloppy teacher who forgets each carry with "
                              "this probability (0 = exact answers); RL has to remove the habit")
    cache_dir: str = opt("", "where warm-up checkpoints are cached (empty = $DPPO_CACHE or ~/.cache/dppo)")
    # ---- task ---------------------------------------------------------------------------------------------
    task: str = opt("arithmetic", "arithmetic: built-in multi-digit addition (exact reward, graded by digits); "
                    "jsonl: math problems from --data scored with math-verify", ("arithmetic", "jsonl"))
    task_digits: int = opt(2, "arithmetic: the hardest level's operand digits (levels 1..N)")
    eval_per_level: int = opt(100, "arithmetic: held-out problems per level")
    data: str = opt("", "jsonl: training file with 'question'/'answer' fields (empty = the bundled sample)")
    eval_data: str = opt("", "jsonl: held-out file (empty = hold out --eval_size rows of --data)")
    eval_size: int = opt(0, "jsonl: rows of --data held out when --eval_data is empty (0 = 10%)")
    reward: str = opt("", "custom reward 'module:function', fn(prompt, response, answer) -> float, replacing "
                      "the task's reward")
    chat_template: bool = opt(True, "wrap prompts of natural-language tasks in the tokenizer's chat template when "
                              "it has one")
    # ---- rollout ------------------------------------------------------------------------------------------
    prompts_per_step: int = opt(32, "prompts per RL step (paper: 64 in the sanity test §5.1, 128–256 in Table 1)")
    group_size: int = opt(8, "responses per prompt G (paper: 8, §5.1 and Table 1 dense/LoRA)")
    max_new_tokens: int = opt(0, "response length cap (0 = the task's hint: digits+2 for arithmetic, 1024 "
                              "otherwise)")
    temperature: float = opt(1.0, "rollout temperature (paper: 1.0, Table 1); log μ is recorded at it")
    top_k: int = opt(0, "rollout top-k truncation (0 = none, the paper's setting); μ is renormalised over the "
                     "kept tokens")
    top_p: float = opt(1.0, "rollout nucleus truncation (1.0 = none, the paper's setting); μ is renormalised")
    rollout_dtype: str = opt("bf16", "rollout engine precision; bf16 rollout vs fp32 training reproduces the "
                             "paper's training–inference mismatch (§5.1: BF16 on purpose)", ("fp32", "bf16", "fp16"))
    rollout_fp32_head: bool = opt(False, "run the rollout engine's lm-head GEMM in fp32 on its upcast hidden state "
                                  "(the FP32 LM head of ScaleRL / MiniMax-M1, trl#4303): less training–inference "
                                  "mismatch. Off by default: the paper's §5.1 mismatch is plain BF16 rollout")
    # ---- loss ---------------------------------------------------------------------------------------------
    method: str = opt("dppo-binary-tv", "policy-loss preset, one of: " + ", ".join(PRESETS) + ". DPPO-Binary-TV "
                      "is the paper's recommended method (§4.4, §7.3)")
    delta_low: float = opt(-1.0, "override the preset's δ_low / ε_low (−1 = keep the preset's: 0.15 for Binary-TV "
                           "§5.1, 0.05 for KL)")
    delta_high: float = opt(-1.0, "override the preset's δ_high / ε_high (−1 = keep the preset's)")
    ratio_cap: float = opt(-1.0, "override the IS-ratio cap C (−1 = keep the preset's; inf = none, §5.1; the "
                           "scaling runs use 5, §7)")
    aggregation: str = opt("", "override the loss aggregation (empty = the preset's seq-mean-token-sum-norm, "
                           "Dr.GRPO, the authors' verl recipe)",
                           ("", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"))
    adv_scale: str = opt("none", "advantage = R − group mean, divided by nothing (paper §2: GRPO without std "
                         "normalisation), the group std or the batch std", ("none", "group-std", "batch-std"))
    # ---- optimisation -------------------------------------------------------------------------------------
    lr: float = opt(1e-4, "AdamW learning rate (paper: 1e-6 full fine-tuning, 1e-5 LoRA, Table 1; the tiny "
                    "default model needs far more)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")
    lr_schedule: str = opt("constant", "learning-rate schedule after the linear warm-up",
                           ("constant", "cosine", "linear"))
    lr_warmup_steps: int = opt(0, "optimizer steps of linear learning-rate warm-up")
    minibatches: int = opt(4, "optimizer steps per rollout batch: the batch is split into this many mini-batches "
                           "(paper: 4 gradient steps per batch, §5.1)")
    epochs: int = opt(1, "passes over each rollout batch")
    micro_batch_size: int = opt(0, "responses per forward/backward (gradient accumulation within a mini-batch, "
                                "exact for every aggregation: each micro-batch loss is divided by the mini-batch's "
                                "denominator; 0 = the whole mini-batch)")
    train_dtype: str = opt("fp32", "training forward precision (bf16 = autocast)", ("fp32", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward instead "
                                       "of keeping them (non-reentrant): less activation memory for one more forward "
                                       "of every layer; same loss and gradients")
    # ---- LoRA (needs peft: pip install 'dppo[lora]') --------------------------------------------------------
    lora_rank: int = opt(0, "LoRA rank r: train low-rank adapters B·A (scaled by alpha/r) on the --lora_target "
                         "layers and freeze the model (0 = full fine-tuning; the paper's LoRA run, §7 Table 1, uses "
                         "r 32 with lr 1e-5)")
    lora_alpha: float = opt(0.0, "LoRA alpha: the adapter output is scaled by alpha/r (0 = 2·r, as the paper's "
                            "LoRA run: r 32, alpha 64, §7 Table 1)")
    lora_dropout: float = opt(0.0, "LoRA dropout; only 0 is accepted: the policy runs without dropout so that π "
                              "is the same function at rollout and in the loss (a dropped-out π would put noise "
                              "into every ratio π/μ the trust region tests)")
    lora_target: str = opt("all-linear", "layers that get adapters: 'all-linear' (every Linear layer except the "
                           "lm-head) or a comma list of module names, e.g. q_proj,k_proj,v_proj,o_proj")
    # ---- evaluation, logging, checkpoints -----------------------------------------------------------------
    eval_every: int = opt(20, "held-out evaluation every N steps (and at the start and end; 0 = only those)")
    eval_samples: int = opt(4, "samples per held-out problem (accuracy = mean over them, as Avg@k; paper: Avg@32)")
    eval_temperature: float = opt(1.0, "held-out sampling temperature (0 = greedy; paper: 0.7 with top-p 0.95, §7)")
    eval_max_problems: int = opt(0, "evaluate on at most this many held-out problems (0 = all)")
    ckpt_every: int = opt(50, "checkpoint (model, optimizer, scheduler, RNG, data position) every N steps and at "
                          "the end (0 = only at the end)")
    tensorboard: bool = opt(True, "write TensorBoard events to the run directory")
    progress: bool = opt(True, "show a progress bar")
    plot: bool = opt(True, "write curves.png into the run directory at the end")


# Fields that may differ when a run directory is resumed (they do not change what the run computes up to its end).
RESUME_MAY_CHANGE = {"steps", "eval_every", "ckpt_every", "tensorboard", "progress", "plot", "threads", "cache_dir",
                     "device", "gradient_checkpointing"}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the option and says what to change."""


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for anything that would fail later. Touches no model and no data beyond checking
    that named files exist."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for f in dataclasses.fields(cfg):
        ch = f.metadata.get("choices")
        if ch:
            v = getattr(cfg, f.name)
            need(v in ch, f"--{f.name} {v!r} is not one of {', '.join(repr(c) for c in ch)}")
    need(cfg.method in PRESETS, f"--method {cfg.method!r} is not a preset; choose one of: {', '.join(PRESETS)}")
    need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}")
    need(cfg.group_size >= 2, f"--group_size {cfg.group_size}: the group baseline Â = R − mean(group) needs at least "
         "2 responses per prompt (with 1, every advantage is 0); set --group_size 2 or more (paper: 8)")
    need(cfg.prompts_per_step >= 1, f"--prompts_per_step must be >= 1, got {cfg.prompts_per_step}")
    need(cfg.minibatches >= 1, f"--minibatches must be >= 1, got {cfg.minibatches}")
    n = cfg.prompts_per_step * cfg.group_size
    need(n % cfg.minibatches == 0,
         f"the batch of {cfg.prompts_per_step} prompts × {cfg.group_size} responses = {n} does not split into "
         f"--minibatches {cfg.minibatches} equal mini-batches; change --minibatches to a divisor of {n} or "
         f"--prompts_per_step so that prompts_per_step × group_size is a multiple of {cfg.minibatches}")
    mb = n // cfg.minibatches
    need(cfg.micro_batch_size >= 0 and (cfg.micro_batch_size == 0 or mb % cfg.micro_batch_size == 0),
         f"--micro_batch_size {cfg.micro_batch_size} does not divide the mini-batch of {mb} responses; use a divisor "
         f"of {mb} or 0")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.temperature > 0, f"--temperature must be > 0 for RL sampling, got {cfg.temperature}")
    need(cfg.eval_temperature >= 0, f"--eval_temperature must be >= 0 (0 = greedy), got {cfg.eval_temperature}")
    need(cfg.top_k >= 0, f"--top_k must be >= 0 (0 = off), got {cfg.top_k}")
    need(0 < cfg.top_p <= 1, f"--top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    need(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    need(cfg.grad_clip >= 0, f"--grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(cfg.max_new_tokens >= 0, f"--max_new_tokens must be >= 0 (0 = the task's default), got {cfg.max_new_tokens}")
    need(cfg.eval_samples >= 1, f"--eval_samples must be >= 1, got {cfg.eval_samples}")
    need(cfg.lora_rank >= 0, f"--lora_rank must be >= 0 (0 = full fine-tuning), got {cfg.lora_rank}")
    need(cfg.lora_alpha >= 0, f"--lora_alpha must be >= 0 (0 = 2 × --lora_rank), got {cfg.lora_alpha}")
    need(0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    need(cfg.lora_dropout == 0, f"--lora_dropout {cfg.lora_dropout}: only 0 is supported. The policy runs in eval "
         "mode so that π is the same function when sampling (log μ) and in the loss (log π): there LoRA dropout would "
         "be silently off, and switched on it would make log π − log μ partly noise that the trust region clips for")
    if cfg.lora_rank:
        targets = [t.strip() for t in cfg.lora_target.split(",")]
        need(all(targets), f"--lora_target {cfg.lora_target!r}: expected 'all-linear' or a comma list of module "
             "names such as q_proj,v_proj")
        import importlib.util

        need(importlib.util.find_spec("peft") is not None, f"--lora_rank {cfg.lora_rank} needs the peft package, "
             "which is not installed: pip install 'dppo[lora]' (or pip install peft), or use --lora_rank 0 for full "
             "fine-tuning")
    for name in ("delta_low", "delta_high", "ratio_cap"):
        v = getattr(cfg, name)
        need(v == -1.0 or v > 0, f"--{name} {v}: must be > 0 (inf to switch off) or -1 to keep the preset's value")
    if cfg.model:
        need(os.path.isdir(cfg.model), f"--model {cfg.model!r} is not a directory: pass a local directory holding a "
             "transformers causal LM (config.json + weights + tokenizer), or leave --model empty for the built-in "
             "tiny model")
        need(os.path.isfile(os.path.join(cfg.model, "config.json")),
             f"--model {cfg.model!r} has no config.json: pass the directory save_pretrained() wrote")
    else:
        need(cfg.task == "arithmetic", f"--task {cfg.task!r} needs a real model: the built-in tiny model only "
             "knows the arithmetic alphabet; pass --model PATH")
        need(cfg.hidden % cfg.heads == 0, f"--hidden {cfg.hidden} must be divisible by --heads {cfg.heads}")
        need(cfg.heads % 2 == 0, f"--heads {cfg.heads} must be even (the tiny model uses 2 KV heads)")
    if cfg.task == "jsonl":
        for name in ("data", "eval_data"):
            p = getattr(cfg, name)
            need(not p or os.path.isfile(p), f"--{name} {p!r} does not exist; pass a JSONL file with "
                 "'question'/'answer' fields")
    if cfg.reward:
        need(":" in cfg.reward, f"--reward {cfg.reward!r}: expected 'module:function'")
    if cfg.device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), f"--device {cfg.device}: no CUDA device is visible; use --device cpu")


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")


def load_config(path: str) -> TrainConfig:
    with open(path) as f:
        d = json.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})
