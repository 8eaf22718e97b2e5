"""RL from verifiable rewards on one machine, anchored to the rollout policy (arXiv 2602.04879).

One step, top to bottom (:meth:`Trainer.step`):

    prompts x_1..x_B                                   task.train_examples(step)      a pure function of (seed, step)
    y_{b,1..G} ~ μ(·|x_b), log μ(a_t), top-K of μ       engine.generate                the rollout engine's precision
    R_{b,i} = reward(x_b, y_{b,i})                      task.reward                    verifiable
    Â_{b,i} = R_{b,i} − mean_i R_{b,i}                  group_advantages               no std normalisation (§2)
    [log π_θ′(a_t)]                                     no-grad forward                only for anchor="recompute"
    for each of `minibatches` mini-batches (4 in §5.1):
        log π_θ(a_t) (+ entropy, + log π_θ at μ's top-K) response_stats                 fp32 log-sum-exp
        loss, metrics = policy_loss(method, log π_θ, log μ, Â, mask, ...)              Eq. 23
        AdamW step on loss, gradient norm clipped

Records flow one way (rollout → advantages → loss → update); the metrics of every step go to metrics.jsonl,
TensorBoard and the progress bar. Checkpoints hold everything a resumed run needs to continue bit-for-bit.

With ``--lora_rank`` the policy is a peft LoRA model (:mod:`dppo.hf.lora`): AdamW, the gradient clip and the checkpoints
hold the adapters alone, and the engine samples with the merged weights W + (α/r)·B·A.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

from dppo.advantages import group_advantages
from dppo.run.checkpoint import load_checkpoint, save_checkpoint
from dppo.run.config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, load_config, save_config, validate
from dppo.loss import aggregation_denominator, policy_loss
from dppo.run.machine import machine_info, machine_line
from dppo.methods import PRESETS, Method
from dppo.run.metrics_log import MetricsLog, read_metrics, summary_line
from dppo.hf.model import checkpointing_active, enable_gradient_checkpointing, load_model, response_stats
from dppo.engines import HFEngine
from dppo.rollout import Rollout, SamplingParams, encode_prompts
from dppo.tasks import Task, make_task

__all__ = ["Trainer", "train", "resolve_method", "NonFiniteError", "evaluate"]

TIMING_KEYS_PREFIX = ("time/", "tokens_per_s", "steps_per_s")


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient: the run stops and the last good checkpoint is kept."""


def resolve_method(cfg: TrainConfig) -> Method:
    """The preset named by ``--method`` with the config's overrides. The Dr.GRPO length normaliser L of
    ``seq-mean-token-sum-norm`` is fixed to the response cap (a constant, as in Dr.GRPO), not the batch's longest
    response, so the loss scale does not depend on how long the longest sample happened to be."""
    m = PRESETS[cfg.method]
    changes: dict = {}
    for name in ("delta_low", "delta_high", "ratio_cap"):
        v = getattr(cfg, name)
        if v != -1.0:
            changes[name] = v
    if cfg.aggregation:
        changes["aggregation"] = cfg.aggregation
    return dataclasses.replace(m, **changes)


def _seed_of(*parts) -> int:
    """A 63-bit seed from (seed, purpose, step): independent streams that do not depend on the run's history."""
    import hashlib

    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _eos_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def decode_responses(tok, ro: Rollout) -> list[str]:
    return [tok.decode(ids[m].tolist(), skip_special_tokens=True) for ids, m in zip(ro.response_ids, ro.response_mask)]


@torch.no_grad()
def evaluate(engine: HFEngine, tok, task: Task, *, max_new_tokens: int, temperature: float, samples: int,
             seed: int, device: str = "cpu", chat_template: bool = True, max_problems: int = 0,
             greedy: bool = True, batch_size: int = 256) -> dict[str, float]:
    """Held-out accuracy: mean correctness over ``samples`` samples per problem (Avg@k) at ``temperature``, overall and
    per difficulty level, plus greedy accuracy. Deterministic in ``seed``."""
    exs = task.eval_examples()
    if max_problems:
        exs = exs[:max_problems]
    gen = torch.Generator(device=device).manual_seed(_seed_of(seed, "eval"))
    runs = [("accuracy", SamplingParams(max_new_tokens, temperature=temperature), samples)]
    if greedy and temperature != 0:
        runs.append(("greedy_accuracy", SamplingParams(max_new_tokens, temperature=0.0), 1))
    out: dict[str, float] = {}
    for key, sp, k in runs:
        correct: list[float] = []
        levels: list[int] = []
        lengths: list[float] = []
        per = max(1, batch_size // k)
        for i in range(0, len(exs), per):
            chunk = exs[i: i + per]
            ids, mask = encode_prompts(tok, [e.prompt for e in chunk], chat_template and task.use_chat_template,
                                       device)
            ro = engine.generate(ids, mask, sp, num_samples=k, generator=gen)
            texts = decode_responses(tok, ro)
            lengths += ro.response_mask.sum(1).tolist()
            for j, text in enumerate(texts):
                ex = chunk[j // k]
                correct.append(float(task.correct(ex, text)))
                levels.append(ex.level)
        out[f"eval/{key}"] = sum(correct) / len(correct)
        if key == "accuracy":
            out["eval/response_len"] = sum(lengths) / len(lengths)
            for lv in sorted(set(levels)):
                if lv:
                    sel = [c for c, l in zip(correct, levels) if l == lv]
                    out[f"eval/accuracy_level{lv}"] = sum(sel) / len(sel)
    return out


class Trainer:
    """Holds the model, engine, optimizer and task of one run; :meth:`step` is one RL step."""

    def __init__(self, cfg: TrainConfig, log=print):
        validate(cfg)
        self.cfg = cfg
        self.log = log
        if cfg.threads or not cfg.model:
            torch.set_num_threads(cfg.threads or 1)
        torch.manual_seed(cfg.seed)
        self.method = resolve_method(cfg)  # raises before any model is built

        self.task = make_task(cfg.task, data=cfg.data or None, eval_data=cfg.eval_data or None,
                              eval_size=cfg.eval_size, digits=cfg.task_digits, eval_per_level=cfg.eval_per_level,
                              reward=cfg.reward or None)
        if cfg.model:
            model_path = cfg.model
        else:
            from dppo.run.warmup import warm_start

            model_path = warm_start(cfg, log=log)
        self.model_path = model_path
        # fp32 master weights; --train_dtype bf16 autocasts the forward, --rollout_dtype sets the engine's copy
        self.model, self.tok = load_model(model_path, dtype="fp32", device=cfg.device)
        # Dropout off: π must be the same function in the rollout and in the loss (RL fine-tuning practice).
        self.model.eval()
        self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens_hint or 1024
        if self.method.aggregation == "seq-mean-token-sum-norm" and self.method.max_len_norm is None:
            self.method = dataclasses.replace(self.method, max_len_norm=self.max_new_tokens)
        # Built before the adapters are added: a bf16 engine keeps a plain copy and is pushed merged LoRA weights.
        self.engine = HFEngine(self.model, eos_token_id=_eos_ids(self.model, self.tok),
                               pad_token_id=self.tok.pad_token_id, dtype=cfg.rollout_dtype,
                               fp32_head=cfg.rollout_fp32_head)
        if cfg.lora_rank:
            from dppo.hf.lora import apply_lora

            # A's random init from its own seed: the global stream depends on whether the warm-up ran or was cached
            torch.manual_seed(_seed_of(cfg.seed, "lora"))
            try:
                self.model = apply_lora(self.model, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                        dropout=cfg.lora_dropout, target=cfg.lora_target)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.model.eval()
        self.ckpt_modules = enable_gradient_checkpointing(self.model) if cfg.gradient_checkpointing else []
        # AdamW and the gradient clip see the trained parameters only (all of them without LoRA)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sampling = SamplingParams(self.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                       top_p=cfg.top_p, record_topk=self.method.topk if self.method.needs_topk else 0)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.total_updates = cfg.steps * cfg.epochs * cfg.minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.autocast = torch.bfloat16 if cfg.train_dtype == "bf16" else None
        n_params = sum(p.numel() for p in self.model.parameters())
        self.n_trainable = sum(p.numel() for p in self.params)
        lora = (f", LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha or 2 * cfg.lora_rank:g} on {cfg.lora_target}"
                if cfg.lora_rank else "")
        head32 = " (fp32 head)" if cfg.rollout_fp32_head else ""
        log(f"model {model_path} ({n_params / 1e6:.2f} M parameters, {self.n_trainable:,} trained{lora}), "
            f"method {self.method.name}, rollout {cfg.rollout_dtype}{head32}, {cfg.prompts_per_step}×{cfg.group_size} "
            f"responses/step, {cfg.minibatches} updates/step"
            + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))

    def _lr_factor(self, update: int) -> float:
        cfg = self.cfg
        if cfg.lr_warmup_steps and update < cfg.lr_warmup_steps:
            return (update + 1) / cfg.lr_warmup_steps
        frac = min(1.0, (update - cfg.lr_warmup_steps) / max(1, self.total_updates - cfg.lr_warmup_steps))
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        return 1.0

    # ------------------------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[Rollout, list, list[str], torch.Tensor]:
        cfg = self.cfg
        examples = self.task.train_examples(step, cfg.prompts_per_step, cfg.seed)
        ids, mask = encode_prompts(self.tok, [e.prompt for e in examples],
                                   cfg.chat_template and self.task.use_chat_template, cfg.device)
        self.engine.sync(self.model)
        gen = torch.Generator(device=cfg.device).manual_seed(_seed_of(cfg.seed, "rollout", step))
        ro = self.engine.generate(ids, mask, self.sampling, num_samples=cfg.group_size, generator=gen)
        texts = decode_responses(self.tok, ro)
        per_response = [ex for ex in examples for _ in range(cfg.group_size)]
        rewards = torch.tensor([self.task.reward(ex, t) for ex, t in zip(per_response, texts)], dtype=torch.float32)
        return ro, per_response, texts, rewards

    def _stats(self, ro: Rollout, idx: torch.Tensor, *, grad: bool):
        gather = ro.rollout_topk_ids[idx] if (self.method.needs_topk and ro.rollout_topk_ids is not None) else None
        ckpt = checkpointing_active(self.ckpt_modules) if grad else nullcontext()
        with torch.set_grad_enabled(grad), ckpt:
            return response_stats(self.model, ro.input_ids[idx], ro.attention_mask[idx], ro.response_ids[idx],
                                  temperature=self.cfg.temperature, gather_ids=gather, entropy=True,
                                  autocast_dtype=self.autocast)

    def step(self, step: int) -> dict:
        """One RL step (0-based ``step``); returns its metrics record (``step`` = updates done = step + 1)."""
        cfg, m = self.cfg, self.method
        t0 = time.perf_counter()

        # 1. rollout: G responses per prompt, log μ and (Top-K methods) μ's top-K recorded at sampling time
        ro, per_response, texts, rewards = self.rollout(step)
        t_rollout = time.perf_counter() - t0
        n = rewards.shape[0]

        # 2. advantages: Â = R − group mean (no std normalisation, §2)
        adv = group_advantages(rewards, cfg.group_size, scale=cfg.adv_scale).to(cfg.device)

        # 3. recompute anchor π_θ′ (MiniRL, *-recompute): one no-grad forward before the first update, timed apart
        t1 = time.perf_counter()
        old_logp = None
        if m.needs_old_logp:
            old_logp = torch.cat([self._stats(ro, idx, grad=False).logp
                                  for idx in self._chunks(torch.arange(n))])
        t_recompute = time.perf_counter() - t1

        # 4. several updates per batch over shuffled mini-batches, each the policy loss of Eq. 23
        t2 = time.perf_counter()
        shuffle = torch.Generator().manual_seed(_seed_of(cfg.seed, "shuffle", step))
        loss_metrics = _LossMetrics()
        ent_sum, ent_tok = 0.0, 0.0
        grad_norms = []
        # The first mini-batch's metrics again, alone: it runs before this step's first update, with the weights the
        # engine was synced to, so its π − μ is the training–inference mismatch alone (precision, kernels, and any
        # misalignment bug between the two pipelines: temperature, position ids, template), without policy drift.
        first_metrics = _LossMetrics()
        mb_size = n // cfg.minibatches
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=shuffle)
            for k in range(cfg.minibatches):
                mb = perm[k * mb_size: (k + 1) * mb_size]
                self.optimizer.zero_grad(set_to_none=True)
                # the mini-batch's aggregation denominator for every micro-batch: their losses sum to its loss exactly
                den = aggregation_denominator(ro.response_mask[mb], m.aggregation, m.max_len_norm)
                for idx in self._chunks(mb):
                    st = self._stats(ro, idx, grad=True)
                    sampled_in = ro.sampled_in_topk[idx] if st.gathered_logp is not None else None
                    loss, met = policy_loss(
                        m, st.logp, ro.rollout_logp[idx], adv[idx], ro.response_mask[idx],
                        old_logp=old_logp[idx] if old_logp is not None else None,
                        topk_logp=st.gathered_logp,
                        rollout_topk_logp=ro.rollout_topk_logp[idx] if st.gathered_logp is not None else None,
                        sampled_in_topk=sampled_in, denominator=den,
                    )
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"loss is {loss.item()} at step {step + 1} (mini-batch {k + 1})")
                    loss.backward()
                    resp = ro.response_mask[idx]
                    n_seqs = float((resp.sum(-1) > 0).sum())
                    loss_metrics.add(met, n_seqs=n_seqs)
                    if epoch == 0 and k == 0:
                        first_metrics.add(met, n_seqs=n_seqs)
                    ent_sum += float((st.entropy.detach() * resp).sum())
                    ent_tok += float(resp.sum())
                gn = torch.nn.utils.clip_grad_norm_(self.params,
                                                    cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if not torch.isfinite(gn):
                    raise NonFiniteError(f"gradient norm is {gn.item()} at step {step + 1} (mini-batch {k + 1})")
                grad_norms.append(float(gn))
                self.optimizer.step()
                self.scheduler.step()
        t_train = time.perf_counter() - t2
        t_step = time.perf_counter() - t0

        # 5. metrics of the step
        resp_tok = float(ro.response_mask.sum())
        groups = rewards.view(-1, cfg.group_size)
        correct = [float(self.task.correct(ex, t)) for ex, t in zip(per_response, texts)]
        rec = {
            "step": step + 1,
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "accuracy": sum(correct) / len(correct),
            "groups_all_equal": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "response_len": resp_tok / n,
            "truncated_frac": float((~ro.finished).float().mean()) if ro.finished is not None else 0.0,
            "entropy": ent_sum / max(ent_tok, 1.0),
            "adv_abs_mean": float(adv.abs().mean()),
        }
        rec.update({f"loss/{k}": v for k, v in loss_metrics.result(n_updates=len(grad_norms)).items()})
        first = first_metrics.result(n_updates=1)
        rec.update({f"mismatch/{k}": first[k] for k in ("abs_diff_mean", "abs_diff_max", "abs_dlogp_mean")})
        rec.update({
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "grad_norm_max": max(grad_norms),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": resp_tok,
            "tokens_per_s": resp_tok / t_step,
            "time/rollout": t_rollout,
            "time/recompute": t_recompute,
            "time/train": t_train,
            "time/step": t_step,
        })
        return rec

    def _chunks(self, idx: torch.Tensor) -> list[torch.Tensor]:
        size = self.cfg.micro_batch_size or len(idx)
        return [idx[i: i + size] for i in range(0, len(idx), size)]

    def evaluate(self, step: int) -> dict:
        t = time.perf_counter()
        self.engine.sync(self.model)
        out = evaluate(self.engine, self.tok, self.task, max_new_tokens=self.max_new_tokens,
                       temperature=self.cfg.eval_temperature, samples=self.cfg.eval_samples,
                       seed=_seed_of(self.cfg.seed, step), device=self.cfg.device,
                       chat_template=self.cfg.chat_template, max_problems=self.cfg.eval_max_problems)
        out["time/eval"] = time.perf_counter() - t
        return out

    def save(self, step: int) -> None:
        save_checkpoint(self.cfg.out, step=step, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, data_position=step * self.cfg.prompts_per_step,
                        extra={"model_path": self.model_path})

    def save_final(self, path: str) -> None:
        """The trained policy as a plain transformers model + tokenizer in ``path``, loadable with ``--model``.

        With LoRA, the adapter alone goes to ``{path}_adapter`` (peft format) and ``path`` gets the merged weights
        W + (α/r)·B·A, written into a fresh fp32 CPU copy of the base model (the same merge the rollout engine
        receives; no second copy of the model on the training device)."""
        from dppo.hf.lora import is_peft_model, load_merged

        if is_peft_model(self.model):
            from transformers import AutoModelForCausalLM

            self.model.save_pretrained(f"{path}_adapter")
            plain = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True, dtype=torch.float32)
            load_merged(self.model, plain)
            plain.save_pretrained(path)
        else:
            self.model.save_pretrained(path)
        self.tok.save_pretrained(path)


def _check_resume(cfg: TrainConfig) -> None:
    """A run directory holding another run's checkpoint is an error, not a silent resume with new settings."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.isfile(path):
        return
    old = dataclasses.asdict(load_config(path))
    new = dataclasses.asdict(cfg)
    diff = [k for k in new if k not in RESUME_MAY_CHANGE and old.get(k) != new[k]]
    if diff:
        lines = ", ".join(f"--{k} {old.get(k)!r} → {new[k]!r}" for k in diff)
        raise ConfigError(f"{cfg.out} holds a checkpoint of a run with other settings ({lines}); pass a new --out "
                          "directory, or the same settings to resume it")


class _LossMetrics:
    """policy_loss metrics of one step, pooled over its micro-batches so that they do not depend on how a mini-batch
    is split: token means weighted by tokens, seq_masked_frac by sequences, max/min over all; ``loss`` and ``tokens``
    summed, then per update (micro-batch losses add up to their mini-batch's loss: ``denominator``)."""

    def __init__(self):
        self.wsum: dict[str, float] = {}
        self.wden: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.sums = {"loss": 0.0, "tokens": 0.0}

    def add(self, met: dict[str, float], *, n_seqs: float) -> None:
        tok = met["tokens"]
        for key, v in met.items():
            if key in self.sums:
                self.sums[key] += v
            elif key.endswith("_max"):
                self.extremes[key] = max(self.extremes.get(key, -math.inf), v)
            elif key.endswith("_min"):
                self.extremes[key] = min(self.extremes.get(key, math.inf), v)
            else:
                w = n_seqs if key == "seq_masked_frac" else tok
                self.wsum[key] = self.wsum.get(key, 0.0) + v * w
                self.wden[key] = self.wden.get(key, 0.0) + w

    def result(self, *, n_updates: int) -> dict[str, float]:
        out = {k: self.wsum[k] / self.wden[k] if self.wden[k] > 0 else 0.0 for k in self.wsum}
        out.update(self.extremes)
        out.update({k: v / max(n_updates, 1) for k, v in self.sums.items()})
        return out


def eval_summary(rows: list[dict]) -> str | None:
    """``held-out accuracy 0.504 (step 0) → 0.779 (step 200); greedy 0.667 → 0.875`` from a run's metric records
    (the whole metrics.jsonl, so a resumed run reports from its true start); None without two evaluations."""
    ev = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    if len(ev) < 2:
        return None
    a, b = ev[0], ev[-1]
    out = f"held-out accuracy {a['eval/accuracy']:.3f} (step {a['step']}) → {b['eval/accuracy']:.3f} (step {b['step']})"
    if "eval/greedy_accuracy" in a and "eval/greedy_accuracy" in b:
        out += f"; greedy {a['eval/greedy_accuracy']:.3f} → {b['eval/greedy_accuracy']:.3f}"
    return out


def _record_machine(run_dir: str, start: int, log) -> None:
    """Append this start's machine to ``RUN/machine.jsonl`` (one line per start or resume): figures from different
    CPUs differ for the same seed, so a run must say where each of its parts ran."""
    info = {"start_step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine_info()}
    with open(os.path.join(run_dir, "machine.jsonl"), "a") as f:
        f.write(json.dumps(info) + "\n")
    log(f"machine: {machine_line(info)}")


def train(cfg: TrainConfig, log=None) -> list[dict]:
    """Run (or resume) the training job of ``cfg``; returns the metric records written by this invocation."""
    from dppo.run.checkpoint import checkpoint_path

    if log is None:
        def log(msg):
            print(msg, file=sys.stderr, flush=True)
    validate(cfg)
    resuming = os.path.isfile(checkpoint_path(cfg.out))
    if resuming:
        _check_resume(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    trainer = Trainer(cfg, log=log)
    save_config(cfg, os.path.join(cfg.out, "config.json"))

    start = 0
    if resuming:
        state = load_checkpoint(cfg.out, model=trainer.model, optimizer=trainer.optimizer,
                                scheduler=trainer.scheduler, map_location=cfg.device)
        start = int(state["step"])
        log(f"resuming {cfg.out} from step {start}")
    _record_machine(cfg.out, start, log)
    mlog = MetricsLog(cfg.out, resume_step=start if resuming else None, tensorboard=cfg.tensorboard)
    written: list[dict] = []
    try:
        if start == 0:
            rec = {"step": 0, **trainer.evaluate(0)}
            mlog.write(rec)
            written.append(rec)
            log(f"step 0 (before RL): held-out accuracy {rec['eval/accuracy']:.3f}"
                + (f", greedy {rec['eval/greedy_accuracy']:.3f}" if "eval/greedy_accuracy" in rec else ""))
        bar = None
        if cfg.progress and start < cfg.steps:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="dppo", unit="step", dynamic_ncols=True)
        last_eval: dict = {}
        for step in range(start, cfg.steps):
            try:
                rec = trainer.step(step)
            except NonFiniteError as e:
                kept = start if not os.path.isfile(checkpoint_path(cfg.out)) else torch.load(
                    checkpoint_path(cfg.out), map_location="cpu", weights_only=False)["step"]
                raise NonFiniteError(
                    f"{e}: stopping. The last good checkpoint (step {kept}) is kept in {cfg.out}/checkpoint; lower "
                    "--lr, set --grad_clip, or pick a method with a trust region, then start again on the same --out "
                    "to resume from it") from None
            s = step + 1
            if s == cfg.steps or (cfg.eval_every and s % cfg.eval_every == 0):
                last_eval = trainer.evaluate(s)
                rec.update(last_eval)
            mlog.write(rec)
            written.append(rec)
            if s == cfg.steps or (cfg.ckpt_every and s % cfg.ckpt_every == 0):
                trainer.save(s)
            if bar is not None:
                bar.set_postfix({**summary_line({**last_eval, **rec})}, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        mlog.close()
    if start < cfg.steps:
        trainer.save_final(os.path.join(cfg.out, "final"))
        summary = eval_summary(read_metrics(os.path.join(cfg.out, "metrics.jsonl")))
        if summary:
            log(summary)
    if cfg.plot:
        try:
            from dppo.report.plot import plot_run

            png = plot_run(cfg.out)
            log(f"curves: {png}")
        except ImportError:
            pass
    return written
