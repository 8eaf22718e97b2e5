"""The training configuration: small typed dataclasses, one per concern, composed into :class:`TrainConfig` and parsed
by tyro (``dppo train --help`` prints every field's docstring and default). Defaults taken from the paper
(arXiv 2602.04879) cite it; anything else is ours.

Flags: one per field, its *flat name* (``--lr 1e-6``, ``--lora_rank 32``, ``--rollout_dtype fp32``), which is also
what :func:`make_config`, a flat config file and every error message use; ``--help`` groups them by section
(model, task, rollout, method, optim, lora, log). ``None`` for a method override means "the preset's
value". A run can start from a saved config: ``dppo train --config RUN/config.json`` (or a TOML / YAML file, nested
sections or flat names), with any flag after it overriding the file.

:func:`dppo.run.validate.validate` rejects a bad configuration before any model is built, naming the option and
what to change; :func:`dppo.run.validate.resolve_method` turns the method options into the one Method a run uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from tyro.conf import arg

__all__ = ["TrainConfig", "ModelConfig", "TaskConfig", "RolloutConfig", "MethodConfig", "OptimConfig", "LoraConfig",
           "EvalConfig", "LogConfig", "ConfigError", "make_config", "load_config", "save_config", "config_dict",
           "flat_names", "RESUME_MAY_CHANGE", "rollout_lag", "vllm_sleep_level"]


def _a(name: str):
    """The one flag of a field: its flat name (``--group_size``, not ``--rollout.group_size``); the section is the
    group ``--help`` lists it under."""
    return arg(name=name, prefix_name=False)


@dataclass
class ModelConfig:
    path: Annotated[str, _a("model")] = ""
    """local directory of a transformers causal LM + tokenizer (e.g. a downloaded Qwen2.5-Math-1.5B); empty = the
    built-in tiny model with a supervised warm-up (the default job)"""
    arch: Annotated[Literal["qwen3", "qwen2", "llama"], _a("arch")] = "qwen3"
    """tiny model: architecture"""
    hidden: Annotated[int, _a("hidden")] = 128
    """tiny model: hidden size"""
    layers: Annotated[int, _a("layers")] = 3
    """tiny model: transformer layers"""
    heads: Annotated[int, _a("heads")] = 4
    """tiny model: attention heads (2 KV heads)"""
    vocab_pad: Annotated[int, _a("vocab_pad")] = 0
    """tiny model: pad the vocabulary to this many ids (0 = the task's alphabet only); the padding ids are real
    logits the model learns to push down, a long tail for Top-K's "other" cell (*ours*)"""
    warmup_steps: Annotated[int, _a("warmup_steps")] = 1500
    """tiny model: supervised warm-up steps before RL, so RL starts from a policy that sometimes succeeds (cached: a
    second run with the same settings skips it)"""
    warmup_lr: Annotated[float, _a("warmup_lr")] = 3e-3
    """tiny model: warm-up learning rate (AdamW, cosine)"""
    warmup_batch: Annotated[int, _a("warmup_batch")] = 64
    """tiny model: warm-up batch size"""
    warmup_noise: Annotated[float, _a("warmup_noise")] = 0.5
    """tiny model: the warm-up imitates a sloppy teacher who forgets each carry with this probability (0 = exact
    answers); RL has to remove the habit"""
    warmup_seed: Annotated[int | None, _a("warmup_seed")] = None
    """tiny model: seed of the warm-up (init and data); None = --seed. Seeds that vary the warm-up model vary the
    starting policy, not only the RL sampling"""
    cache_dir: Annotated[str, _a("cache_dir")] = ""
    """where warm-up checkpoints are cached (empty = $DPPO_CACHE or ~/.cache/dppo)"""


@dataclass
class TaskConfig:
    name: Annotated[Literal["arithmetic", "addition-steps", "jsonl"], _a("task")] = "arithmetic"
    """arithmetic: built-in multi-digit addition (exact reward, graded by digits); addition-steps: long addition
    written out column by column (tens of tokens per response, reward on the final sum; *ours*); jsonl: math
    problems from --data scored with math-verify"""
    digits: Annotated[int, _a("task_digits")] = 2
    """arithmetic: the hardest level's operand digits (levels 1..N); addition-steps: the operands' digits"""
    num_problems: Annotated[int, _a("task_num_problems")] = 0
    """arithmetic, addition-steps: train on a fixed set of this many problems, drawn once from the run's seed (the sanity test's
    fixed problem set, §5.1); 0 = fresh problems every step"""
    eval_per_level: Annotated[int, _a("eval_per_level")] = 100
    """arithmetic: held-out problems per level; addition-steps: held-out problems"""
    data: Annotated[str, _a("data")] = ""
    """jsonl: training file with 'question'/'answer' fields (empty = the bundled sample)"""
    eval_data: Annotated[str, _a("eval_data")] = ""
    """jsonl: held-out file (empty = hold out --eval_size rows of --data)"""
    eval_size: Annotated[int, _a("eval_size")] = 0
    """jsonl: rows of --data held out when --eval_data is empty (0 = 10%)"""
    reward: Annotated[str, _a("reward")] = ""
    """custom reward 'module:function', fn(prompt, response, answer) -> float, replacing the task's reward"""
    chat_template: Annotated[bool, _a("chat_template")] = True
    """wrap prompts of natural-language tasks in the tokenizer's chat template when it has one"""
    eos_tokens: Annotated[tuple[str, ...], _a("eos_tokens")] = ()
    """extra strings that end a response (each must be one token of the tokenizer), besides its EOS, the model's
    generation_config EOS ids and the chat template's end-of-turn token"""


@dataclass
class RolloutConfig:
    prompts_per_step: Annotated[int, _a("prompts_per_step")] = 32
    """prompts per RL step (paper: 64 in the sanity test §5.1, 128–256 in Table 1)"""
    group_size: Annotated[int, _a("group_size")] = 8
    """responses per prompt G (paper: 8, §5.1 and Table 1 dense/LoRA)"""
    max_new_tokens: Annotated[int, _a("max_new_tokens")] = 0
    """response length cap (0 = the task's hint: digits+2 for arithmetic, 1024 otherwise)"""
    temperature: Annotated[float, _a("temperature")] = 1.0
    """rollout temperature (paper: 1.0, Table 1); log μ is recorded at it"""
    top_k: Annotated[int, _a("top_k")] = 0
    """rollout top-k truncation (0 = none, the paper's setting); μ is renormalised over the kept tokens"""
    top_p: Annotated[float, _a("top_p")] = 1.0
    """rollout nucleus truncation (1.0 = none, the paper's setting); μ is renormalised"""
    dtype: Annotated[Literal["fp32", "bf16", "fp16", "fp8"], _a("rollout_dtype")] = "bf16"
    """rollout engine precision; bf16 rollout vs fp32 training reproduces the paper's training–inference mismatch
    (§5.1: BF16 on purpose). fp8: the engine's linear weights in float8 e4m3 with one scale per output channel, bf16
    compute (an FP8 rollout as verl / OpenRLHF users run it; HF engine on any device, vLLM's own FP8 on CUDA)"""
    fp32_head: Annotated[bool, _a("rollout_fp32_head")] = False
    """run the rollout engine's lm-head GEMM in fp32 on its upcast hidden state (the FP32 LM head of ScaleRL /
    MiniMax-M1, trl#4303): less training–inference mismatch. Off by default: the paper's §5.1 mismatch is plain BF16
    rollout"""
    engine: Annotated[Literal["hf", "vllm"], _a("engine")] = "hf"
    """rollout engine: hf = dppo's own decode loop over the transformers policy (any device, no extra package; the
    default job's); vllm = vLLM in the trainer's process (pip install 'dppo[vllm]'), the engine to use on a GPU"""
    batch_size: Annotated[int, _a("rollout_batch_size")] = 256
    """responses the engine generates at a time: HF engine chunks of whole groups (its KV cache and logits grow with
    this, not with prompts × group size; the rollout is identical for any value), vLLM's max_num_seqs (*ours*: the
    default job's 32 × 8 in one chunk)"""
    vllm_gpu_memory_utilization: Annotated[float, _a("vllm_gpu_memory_utilization")] = 0.3
    """vLLM on a GPU: fraction of GPU memory it may take (weights, activations, KV cache), shared with the trainer
    (0.3 = TRL's colocate default). On a CPU the KV cache is sized for --rollout_batch_size sequences of
    --vllm_max_model_len tokens instead"""
    vllm_max_model_len: Annotated[int, _a("vllm_max_model_len")] = 0
    """vLLM: longest prompt + response in tokens (0 = the model's max_position_embeddings); lower it to shrink the
    KV cache"""
    vllm_sleep: Annotated[Literal[0, 1, 2] | None, _a("vllm_sleep")] = None
    """vLLM's sleep mode between rollouts, so that training gets the GPU memory back: 1 = free the KV cache and
    offload the weights to CPU memory, 2 = free the KV cache and discard the weights (each sync rewrites all of them;
    TRL's colocate mode uses 2), 0 = the engine stays resident (its weights and KV cache held while the policy
    trains). None = 2 on a CUDA GPU, 0 elsewhere (vLLM has no sleep mode on the CPU, where 1 and 2 are refused) and
    with --async_rollout (whose engine samples while the trainer trains)"""
    vllm_enforce_eager: Annotated[bool, _a("vllm_enforce_eager")] = False
    """vLLM: eager mode, no CUDA graphs / torch.compile: starts in seconds instead of 25–50 s on a 2-core CPU,
    decodes up to 19 % slower there (docs/benchmarks.md)"""
    lag: Annotated[int, _a("rollout_lag")] = 0
    """staleness k: step t's batch is sampled with the policy as it was k steps earlier (at the start of step t−k;
    the first k steps use the initial policy), synchronously. μ stays what the engine sampled with, and the trust
    region anchors to it; the recompute anchor π_θ′ is the policy at the start of step t. 0 = on-policy rollouts
    (the paper). Keeps k fp32 copies of the weights in memory and in each checkpoint"""
    async_rollout: Annotated[int, _a("async_rollout")] = 0
    """k >= 1: a rollout worker process samples step t+1's batch while the trainer trains on step t's, with the
    policy of step t+1−k: exactly what --rollout_lag k computes (the largest staleness allowed, as verl's
    one-step-off / prime-rl's max_off_policy_steps); 0 = off (sample, then train)"""
    threads: Annotated[int, _a("rollout_threads")] = 0
    """torch CPU threads of the --async_rollout worker (0 = the trainer's --threads); the trainer and the worker
    split the cores"""
    logit_noise: Annotated[float, _a("rollout_logit_noise")] = 0.0
    """σ of Gaussian noise added to every logit the engine samples from (log μ is that noisy distribution's): a
    stress knob that scales the training–inference mismatch (*ours*; 0 = off)"""


@dataclass
class MethodConfig:
    name: Annotated[str, _a("method")] = "dppo-binary-tv"
    """policy-loss preset (dppo.PRESETS), optionally with Method field overrides: NAME or NAME@field=value,...
    (e.g. cispo@ratio_cap=3). DPPO-Binary-TV is the paper's recommended method (§4.4, §7.3)"""
    delta_low: Annotated[float | None, _a("delta_low")] = None
    """override the preset's δ_low / ε_low (None = the preset's: 0.15 for Binary-TV §5.1, 0.05 for KL)"""
    delta_high: Annotated[float | None, _a("delta_high")] = None
    """override the preset's δ_high / ε_high (None = the preset's)"""
    ratio_cap: Annotated[float | None, _a("ratio_cap")] = None
    """override the IS-ratio cap C (None = the preset's; inf = none, §5.1; the scaling runs use 5, §7)"""
    aggregation: Annotated[
        Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"] | None, _a("aggregation")
    ] = None
    """override the loss aggregation (None = the preset's; seq-mean-token-sum-norm = Dr.GRPO, the authors' verl
    recipe)"""
    adv_scale: Annotated[Literal["none", "group-std", "batch-std"], _a("adv_scale")] = "none"
    """advantage = R − group mean, divided by nothing (paper §2: GRPO without std normalisation), the group std or
    the batch std"""
    adv_baseline: Annotated[Literal["mean", "leave-one-out"], _a("adv_baseline")] = "mean"
    """the baseline subtracted from each reward: the group mean (paper §2, GRPO) or the mean of the other G−1 rewards
    of the group (RLOO, leave-one-out)"""


@dataclass
class OptimConfig:
    lr: Annotated[float, _a("lr")] = 1e-4
    """AdamW learning rate (paper: 1e-6 full fine-tuning, 1e-5 LoRA, Table 1; the tiny default model needs far
    more)"""
    weight_decay: Annotated[float, _a("weight_decay")] = 0.0
    """AdamW weight decay"""
    grad_clip: Annotated[float, _a("grad_clip")] = 1.0
    """max global gradient norm (0 = off)"""
    lr_schedule: Annotated[Literal["constant", "cosine", "linear"], _a("lr_schedule")] = "constant"
    """learning-rate schedule after the linear warm-up"""
    lr_warmup_steps: Annotated[int, _a("lr_warmup_steps")] = 0
    """optimizer steps of linear learning-rate warm-up"""
    minibatches: Annotated[int, _a("minibatches")] = 4
    """optimizer steps per rollout batch: the batch is split into this many mini-batches (paper: 4 gradient steps
    per batch, §5.1)"""
    epochs: Annotated[int, _a("epochs")] = 1
    """passes over each rollout batch"""
    micro_batch_size: Annotated[int, _a("micro_batch_size")] = 0
    """responses per forward/backward (gradient accumulation within a mini-batch, exact for every aggregation: each
    micro-batch loss is divided by the mini-batch's denominator; 0 = the whole mini-batch)"""
    train_dtype: Annotated[Literal["fp32", "bf16"], _a("train_dtype")] = "fp32"
    """training forward precision (bf16 = autocast)"""
    fused_loss: Annotated[bool, _a("fused_loss")] = True
    """compute the log-probs, the policy loss and its gradient w.r.t. the hidden states and the head in one tiled
    pass (dppo.policy_loss_from_hidden: 3 GEMMs of tokens × vocabulary × hidden, no [N, V] tensor) where the head is
    plain h·Wᵀ + b; the same loss and gradients as the two-pass path (tested)"""
    share_prompts: Annotated[bool, _a("share_prompts")] = True
    """run each group's prompt once in the training forward and let its responses attend to that one prompt KV
    (exact; saves (G−1)/G of the prompt compute for the rows of a group in the same micro-batch). Off by itself where
    the model cannot (sliding-window attention, gradient checkpointing, a logits post-processor)"""
    gradient_checkpointing: Annotated[bool, _a("gradient_checkpointing")] = False
    """recompute each decoder layer's activations in the backward instead of keeping them (non-reentrant): less
    activation memory for one more forward of every layer; same loss and gradients"""
    fsdp_param_dtype: Annotated[Literal["fp32", "bf16"], _a("fsdp_param_dtype")] = "fp32"
    """under torchrun: the dtype FSDP2 gathers the sharded fp32 master weights to for the training forward/backward
    (bf16 halves the gathered weights and the activations; the optimizer keeps fp32). Ignored by one process"""
    fsdp_reduce_dtype: Annotated[Literal["fp32", "bf16"], _a("fsdp_reduce_dtype")] = "fp32"
    """under torchrun: the dtype gradients are summed across processes in (bf16 halves the traffic and rounds each
    gradient to 8 significant bits before the sum). Ignored by one process"""


@dataclass
class LoraConfig:
    rank: Annotated[int, _a("lora_rank")] = 0
    """LoRA rank r: train low-rank adapters B·A (scaled by alpha/r) on the --lora_target layers and freeze the model
    (0 = full fine-tuning; the paper's LoRA run, §7 Table 1, uses r 32 with lr 1e-5). Needs pip install 'dppo[lora]'"""
    alpha: Annotated[float, _a("lora_alpha")] = 0.0
    """LoRA alpha: the adapter output is scaled by alpha/r (0 = 2·r, as the paper's LoRA run: r 32, alpha 64,
    §7 Table 1)"""
    dropout: Annotated[float, _a("lora_dropout")] = 0.0
    """LoRA dropout, applied in the training forward only; the rollout engine samples with the merged weights, so a
    dropout > 0 makes log π − log μ partly noise that the trust region then masks for (0 recommended)"""
    target: Annotated[str, _a("lora_target")] = "all-linear"
    """layers that get adapters: 'all-linear' (every Linear layer except the lm-head) or a comma list of module
    names, e.g. q_proj,k_proj,v_proj,o_proj"""


@dataclass
class EvalConfig:
    every: Annotated[int, _a("eval_every")] = 20
    """held-out evaluation every N steps (and at the start and end; 0 = only those)"""
    samples: Annotated[int, _a("eval_samples")] = 4
    """samples per held-out problem: accuracy = the mean over them (Avg@k; paper: Avg@32, §7)"""
    temperature: Annotated[float, _a("eval_temperature")] = 1.0
    """held-out sampling temperature (0 = greedy; paper: 0.7 with top-p 0.95, §7)"""
    top_p: Annotated[float, _a("eval_top_p")] = 1.0
    """held-out nucleus sampling (1.0 = none; paper: 0.95 with temperature 0.7, §7)"""
    max_problems: Annotated[int, _a("eval_max_problems")] = 0
    """evaluate on at most this many held-out problems (0 = all)"""


@dataclass
class LogConfig:
    ckpt_every: Annotated[int, _a("ckpt_every")] = 50
    """checkpoint (model, optimizer, scheduler, RNG, data position) every N steps and at the end (0 = only at the
    end); SIGTERM/SIGINT also write one"""
    keep_checkpoints: Annotated[int, _a("keep_checkpoints")] = 2
    """checkpoints kept (the newest ones): with 2, a newest checkpoint that turns out corrupt falls back to the one
    before"""
    tensorboard: Annotated[bool, _a("tensorboard")] = True
    """write TensorBoard events to the run directory"""
    report_to: Annotated[tuple[Literal["wandb"], ...], _a("report_to")] = ()
    """more trackers besides metrics.jsonl and TensorBoard: wandb (pip install 'dppo[wandb]'; project from
    $WANDB_PROJECT, offline with WANDB_MODE=offline)"""
    on_bad_reward: Annotated[Literal["stop", "zero"], _a("on_bad_reward")] = "stop"
    """a reward function that raises or returns NaN/inf/a non-number: stop the run naming the prompt, response and
    cause, or score that response 0 and count it in reward/bad"""
    progress: Annotated[bool, _a("progress")] = True
    """show a progress bar"""
    plot: Annotated[bool, _a("plot")] = True
    """write curves.png into the run directory at the end"""


@dataclass
class TrainConfig:
    """RL fine-tuning with a divergence trust region (DPPO, arXiv 2602.04879). With no options: the built-in
    arithmetic task on a tiny Qwen3 model, CPU, no downloads. Starting again on the same --out resumes."""

    out: str = "runs/default"
    """run directory (config.json, method.json, metrics.jsonl, TensorBoard events, checkpoints/); starting again on a
    directory with a checkpoint resumes the run"""
    seed: int = 0
    """seed of everything: model init, warm-up data, prompts of every step, sampling"""
    steps: int = 200
    """RL steps (one rollout batch each)"""
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:1, …"""
    threads: int = 0
    """torch CPU threads (0 = auto: 1 for the built-in tiny model, whose matrices are too small to gain from more
    and which slows down badly on a busy machine; torch's default otherwise)"""
    dist_timeout: float = 600.0
    """under torchrun: seconds a process waits in one collective (a gradient sum, a weight gather) for the others
    before the job stops with a message naming the process and the phase; bounds the hang when a process dies
    (*ours*; torch's default is 1800). The long phases a process runs alone have their own bound,
    --dist_phase_timeout"""
    dist_phase_timeout: float = 3600.0
    """under torchrun: seconds a process waits for the others at the end of a phase each runs on its own for long:
    the model load and warm-up, rollout generation, evaluation, a checkpoint write, the final export (rank 0 alone);
    a process that has not arrived by then is named in the error (*ours*)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS = ("model", "task", "rollout", "method", "optim", "lora", "eval", "log")

# Fields that may differ when a run directory is resumed (they do not change what the run computes up to its end).
RESUME_MAY_CHANGE = {"steps", "eval.every", "rollout.batch_size", "rollout.threads",
                     "rollout.vllm_gpu_memory_utilization", "rollout.vllm_sleep", "log.ckpt_every",
                     "log.keep_checkpoints", "log.tensorboard", "log.report_to", "log.progress", "log.plot", "threads",
                     "model.cache_dir", "device", "optim.gradient_checkpointing", "dist_timeout", "dist_phase_timeout"}


# Exit statuses of `dppo train` (docs/training.md, "Checkpoints and resume"); here, below the command line and the
# torchrun watchdog that both exit with them.
EXIT = {"ok": 0, "config": 2, "nonfinite": 3, "checkpoint_write": 4, "bad_reward": 5, "checkpoint_load": 6,
        "process_lost": 7, "rollout_worker": 8, "rollout_engine": 8, "preempted": 75}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the option and says what to change."""


def flat_names() -> dict[str, str]:
    """``{flat name: "section.field"}`` for every field of every section (its flag)."""
    out = {}
    for sec in SECTIONS:
        cls = typing.get_type_hints(TrainConfig)[sec]
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            for meta in getattr(hints[f.name], "__metadata__", ()):
                if getattr(meta, "name", None):
                    out[meta.name] = f"{sec}.{f.name}"
    return out


def vllm_sleep_level(cfg: TrainConfig) -> int:
    """The vLLM engine's sleep level: ``--vllm_sleep``, or with None 2 on a CUDA device (0 on the CPU, with
    --async_rollout and with the HF engine)."""
    ro = cfg.rollout
    if ro.vllm_sleep is not None:
        return int(ro.vllm_sleep)
    return 2 if ro.engine == "vllm" and cfg.device.startswith("cuda") and not ro.async_rollout else 0


def rollout_lag(cfg: TrainConfig) -> int:
    """The run's staleness k: ``--async_rollout k`` computes what ``--rollout_lag k`` does (either may be given)."""
    return max(cfg.rollout.lag, cfg.rollout.async_rollout)


def config_dict(cfg: TrainConfig) -> dict:
    """``{"seed": 0, "optim.lr": 1e-4, …}``: every field by its dotted path."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def make_config(base: TrainConfig | None = None, **values) -> TrainConfig:
    """A :class:`TrainConfig` from keyword values by flat name (``lr=1e-3, lora_rank=8``), dotted path
    (``**{"optim.lr": 1e-3}``), top-level field, or section (``optim=OptimConfig(...)`` or a dict); on top of
    ``base`` (default: the defaults). An unknown name is a :class:`ConfigError` that names it."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    cfg = TrainConfig(**{s: dataclasses.replace(getattr(cfg, s)) if s in SECTIONS else getattr(cfg, s)
                         for s in (f.name for f in dataclasses.fields(TrainConfig))})
    flat = flat_names()
    for key, v in values.items():
        if key in SECTIONS and (isinstance(v, dict) or dataclasses.is_dataclass(v)):
            items = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, vv in items.items():
                _set(cfg, f"{key}.{k}", vv)
        elif key in flat:
            _set(cfg, flat[key], v)
        elif "." in key or key in {f.name for f in dataclasses.fields(TrainConfig)}:
            _set(cfg, key, v)
        else:
            raise ConfigError(f"unknown option {key!r}; see `dppo train --help`")
    return cfg


def _set(cfg: TrainConfig, path: str, value) -> None:
    sec, _, name = path.rpartition(".")
    target = getattr(cfg, sec) if sec else cfg
    if sec and sec not in SECTIONS or name not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown option {path!r}; see `dppo train --help`")
    if isinstance(value, list):
        value = tuple(value)
    setattr(target, name, value)


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")


def load_config(path: str, base: TrainConfig | None = None) -> TrainConfig:
    """A config file (.json, .toml, .yaml/.yml) with nested sections (as ``config.json`` is written) or flat names
    (as older runs wrote it), applied on top of ``base``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if ext == ".toml":
            import tomllib

            d = tomllib.loads(raw.decode())
        elif ext in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(raw)
        else:
            d = json.loads(raw)
    except Exception as e:  # noqa: BLE001 - any parser's error, reported with the file
        raise ConfigError(f"--config {path!r} cannot be parsed: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of options, got {type(d).__name__}")
    return make_config(base, **d)
