"""RL from verifiable rewards, anchored to the rollout policy (arXiv 2602.04879). One step, top to bottom
(:meth:`Trainer.step`):

    prompts x_1..x_B                                   task.train_examples(step)      a pure function of (seed, step)
    y_{b,1..G} ~ μ(·|x_b), log μ(a_t), top-K of μ       engine.generate                the rollout engine's precision
    R_{b,i} = reward(x_b, y_{b,i})                      tasks.scoring.score            verifiable; failures named
    Â_{b,i} = R_{b,i} − mean_i R_{b,i}                  group_advantages               no std normalisation (§2)
    [log π_θ′(a_t)]                                     no-grad forward                only for anchor="recompute"
    for each of `minibatches` mini-batches (4 in §5.1):
        log π_θ(a_t) (+ entropy, + log π_θ at μ's top-K) response_stats                 fp32 log-sum-exp
        loss, metrics = policy_loss(method, log π_θ, log μ, Â, mask, ...)              Eq. 23
        AdamW step on loss, gradient norm clipped

Records flow one way (rollout → advantages → loss → update). The loop around it (resume, evaluation, checkpoints,
preemption) is :mod:`dppo.run.loop`.

Stale rollouts (:mod:`dppo.run.staleness`): with ``--rollout_lag k`` step t's batch is sampled with the policy of
the start of step t−k (μ is still what the engine sampled with); ``--async_rollout k`` computes the same batches in a
worker process (:mod:`dppo.engines.worker`) that samples step t+1's while the trainer trains on step t's.

With ``--lora_rank`` the policy is a peft LoRA model (:mod:`dppo.hf.lora`): AdamW, the gradient clip and the
checkpoints hold the adapters alone, and the engine samples with the merged weights W + (α/r)·B·A.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext

import torch

from dppo.advantages import group_advantages
from dppo.engines import make_engine
from dppo.fused import policy_loss_from_hidden
from dppo.hf.model import (can_share_prompts, decoder_and_head, enable_gradient_checkpointing, eos_token_ids,
                           load_skeleton, response_hidden_states, response_stats, training_mode)
from dppo.loss import aggregation_denominator, policy_loss
from dppo.methods import Method
from dppo.metrics import MetricPool
from dppo.rollout import Rollout, RolloutEngineError, SamplingParams, encode_prompts, prompt_seeds
from dppo.run.batch import Batch
from dppo.run.config import ConfigError, TrainConfig, rollout_lag, vllm_sleep_level
from dppo.run.distributed import Local
from dppo.run.staleness import WeightHistory
from dppo.run.validate import fix_length_norm, validate
from dppo.run.evaluate import decode_responses, evaluate
from dppo.tasks import make_task
from dppo.tasks.scoring import score

__all__ = ["Trainer", "NonFiniteError", "StepAbandoned", "seed_of"]


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient: the run stops and the last good checkpoint is kept."""


class StepAbandoned(Exception):
    """A stop was requested before the step's first update: the policy is as the previous step left it."""


def seed_of(*parts) -> int:
    """A 63-bit seed from (seed, purpose, step): independent streams that do not depend on the run's history."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class Trainer:
    """Holds the model, engine, optimizer and task of one run; :meth:`step` is one RL step. ``should_stop`` is
    polled before a step's first update (a preemption request abandons the step there). ``dist``: this process's
    share of a torchrun job (:mod:`dppo.run.distributed`), consulted at the points marked [dist]; None = one
    process, where every hook is the identity."""

    def __init__(self, cfg: TrainConfig, log=print, should_stop=lambda: False, dist=None, method: Method | None = None):
        method = method or validate(cfg)  # ``method``: validate(cfg)'s, when the caller has validated already
        self.cfg, self.log, self.should_stop = cfg, log, should_stop
        self.dist = dist or Local()
        if cfg.threads or not cfg.model.path:
            torch.set_num_threads(cfg.threads or 1)
        torch.manual_seed(cfg.seed)
        tc = cfg.task
        self.task = make_task(tc.name, data=tc.data or None, eval_data=tc.eval_data or None, eval_size=tc.eval_size,
                              digits=tc.digits, eval_per_level=tc.eval_per_level, reward=tc.reward or None,
                              num_problems=tc.num_problems)
        if cfg.model.path:
            self.model_path = cfg.model.path
        else:
            from dppo.run.warmup import warm_start_for

            self.model_path = self.dist.first(lambda: warm_start_for(cfg, log=log))  # [dist] rank 0 fills the cache
        # fp32 master weights; --train_dtype bf16 autocasts the forward, --rollout_dtype sets the engine's copy.
        # [dist] rank 0 reads them; the other processes hold a meta skeleton until shard() broadcasts the shards
        self.model, self.tok = self.dist.load_policy(self.model_path, cfg.device)
        self.model.eval()  # no dropout: π must be the same function in the rollout and in the loss
        self.max_new_tokens = cfg.rollout.max_new_tokens or self.task.max_new_tokens_hint or 1024
        self.method = fix_length_norm(method, self.max_new_tokens)
        try:
            eos = eos_token_ids(self.model, self.tok, tc.eos_tokens)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # Built before the adapters are added: a bf16 engine keeps a plain copy and is pushed merged LoRA weights.
        rc = cfg.rollout
        self.lag = rollout_lag(cfg)
        # w_{t−k} … w_t while a later rollout may sample with them (shared memory: handed to the worker by handle)
        self.history = WeightHistory(self.lag, share_memory=bool(rc.async_rollout)) if self.lag else None
        self._inflight: dict = {}  # step → its batch, sampled by the worker while the trainer trains (--async_rollout)
        self._engine_version: int | None = None  # the w_j the in-process engine holds (None: the current policy)
        vllm_kw = dict(vllm_max_model_len=rc.vllm_max_model_len,
                       vllm_gpu_memory_utilization=rc.vllm_gpu_memory_utilization,
                       vllm_enforce_eager=rc.vllm_enforce_eager, vllm_sleep=vllm_sleep_level(cfg))
        self.dist.enter("engine start-up")
        if rc.async_rollout:
            from dppo.engines.worker import EngineSpec, EngineWorker

            self.engine = EngineWorker(EngineSpec(
                name=rc.engine, model_path=self.model_path, eos_token_id=list(eos), pad_token_id=self.tok.pad_token_id,
                dtype=rc.dtype, fp32_head=rc.fp32_head, batch_size=rc.batch_size, max_logprobs=self.method.topk,
                seed=cfg.seed, device=self._device(), threads=rc.threads or cfg.threads or 1,
                vllm=vllm_kw))
            log(f"async rollout: {self.engine.description}, staleness {rc.async_rollout}")
        else:
            # [dist] the HF engine's own copy from a skeleton (no second fp32 copy of the weights; the first sync fills
            # it), since a sharded policy cannot be sampled with
            skeleton = load_skeleton(self.model_path)[0] if self.dist.active and rc.engine == "hf" else None
            self.engine = make_engine(rc.engine, self.model if skeleton is None else skeleton, self.model_path,
                                      eos_token_id=eos, pad_token_id=self.tok.pad_token_id, dtype=rc.dtype,
                                      fp32_head=rc.fp32_head,
                                      # a lagged engine holds w_{t−k}
                                      own_copy=self.dist.active or self.lag > 0, device=self._device(),
                                      batch_size=rc.batch_size, max_logprobs=self.method.topk, seed=cfg.seed,
                                      **vllm_kw)
            del skeleton
            self.engine.sleep()  # vLLM's sleep mode: the GPU memory back for the policy until the first rollout
        self.dist.arrive("engine start-up")
        self._add_lora()
        self.train_modules = enable_gradient_checkpointing(self.model) if cfg.optim.gradient_checkpointing else []
        if cfg.lora.rank and cfg.lora.dropout > 0:
            self.train_modules += [mod for name, mod in self.model.named_modules()
                                   if isinstance(mod, torch.nn.Dropout) and "lora_dropout" in name]
        self.dist.shard(self.model, cfg.optim)  # [dist] FSDP2: each decoder layer and the rest sharded across processes
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # the adapters alone under LoRA
        # (decoder body, lm head) for the fused statistics + loss; None: the logits path (a post-processed head)
        self.head = decoder_and_head(self.model) if cfg.optim.fused_loss else None
        rc = cfg.rollout
        self.sampling = SamplingParams(self.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                       top_p=rc.top_p, record_topk=self.method.topk if self.method.needs_topk else 0,
                                       logit_noise=rc.logit_noise)
        oc = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=oc.lr, weight_decay=oc.weight_decay)
        self.total_updates = cfg.steps * oc.epochs * oc.minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.autocast = torch.bfloat16 if oc.train_dtype == "bf16" else None
        self._describe(eos)

    def _device(self) -> str:
        """This process's device ([dist] under torchrun on CUDA: the GPU of its LOCAL_RANK)."""
        d = self.cfg.device
        return f"cuda:{self.dist.local_rank}" if d == "cuda" and self.dist.active else d

    def _add_lora(self) -> None:
        lc = self.cfg.lora
        if not lc.rank:
            return
        from dppo.hf.lora import apply_lora

        # A's random init from its own seed: the global stream depends on whether the warm-up ran or was cached
        torch.manual_seed(seed_of(self.cfg.seed, "lora"))
        try:
            self.model = apply_lora(self.model, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target=lc.target)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model.eval()

    def _describe(self, eos: list[int]) -> None:
        cfg, m = self.cfg, self.method
        n_params = sum(p.numel() for p in self.model.parameters())
        self.n_trainable = sum(p.numel() for p in self.params)
        lc = cfg.lora
        lora = f", LoRA r={lc.rank} alpha={lc.alpha or 2 * lc.rank:g} on {lc.target}" if lc.rank else ""
        head32 = f" {cfg.rollout.engine} engine" + (" (fp32 head)" if cfg.rollout.fp32_head else "")
        self.log(f"model {self.model_path} ({n_params / 1e6:.2f} M parameters, {self.n_trainable:,} trained{lora}), "
                 f"method {m.name}, rollout {cfg.rollout.dtype}{head32}, {cfg.rollout.prompts_per_step}×"
                 f"{cfg.rollout.group_size} responses/step, {cfg.optim.minibatches} updates/step, EOS ids {eos}"
                 + (", gradient checkpointing" if cfg.optim.gradient_checkpointing else ""))
        truncated = cfg.rollout.top_k or cfg.rollout.top_p < 1
        if truncated and (m.estimator != "none" or m.ratio_cap != math.inf or m.loss_form != "is"):
            self.log(f"warning: --top_k {cfg.rollout.top_k} / --top_p {cfg.rollout.top_p} truncate the sampling "
                     f"distribution μ, and {m.name} measures the policy against it: every kept token's π/μ carries "
                     "the factor 1/(kept mass), which biases the ratio and the trust region (trl#6789). The paper "
                     "samples the full distribution (Table 1: temperature 1.0, no top-k/top-p).")

    def _lr_factor(self, update: int) -> float:
        oc = self.cfg.optim
        if oc.lr_warmup_steps and update < oc.lr_warmup_steps:
            return (update + 1) / oc.lr_warmup_steps
        frac = min(1.0, (update - oc.lr_warmup_steps) / max(1, self.total_updates - oc.lr_warmup_steps))
        if oc.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        if oc.lr_schedule == "linear":
            return 1.0 - frac
        return 1.0

    # ------------------------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """One RL step (0-based ``step``); returns its metrics record (``step`` = steps done = step + 1)."""
        cfg, m = self.cfg, self.method
        t0 = time.perf_counter()

        # 1. rollout: G responses per prompt, log μ and (Top-K methods) μ's top-K recorded at sampling time
        ro, per_response, texts = self.rollout(step)

        # 2. rewards (a failing reward function is named, never a silent NaN) and advantages Â = R − group mean
        rewards, n_bad = score(self.task, per_response, texts, on_bad=cfg.log.on_bad_reward,
                               group_size=cfg.rollout.group_size)
        correct = torch.tensor([float(self.task.correct(ex, t)) for ex, t in zip(per_response, texts)])
        finished = ro.finished if ro.finished is not None else torch.ones(len(texts), dtype=torch.bool)
        self.dist.arrive("rollout")  # [dist] every process has sampled and scored its share (--dist_phase_timeout)
        # [dist] the whole batch's rows in prompt order, on every process (this process's rows are a share of them)
        rewards, correct, mask, finished = self.dist.gather_rows(rewards, correct, ro.response_mask, finished)
        (n_bad,) = self.dist.sum(n_bad)
        adv = group_advantages(rewards, cfg.rollout.group_size, scale=cfg.method.adv_scale,
                               baseline=cfg.method.adv_baseline).to(cfg.device)
        batch = Batch.from_rollout(ro, adv[self.dist.share(len(adv))], cfg.rollout.group_size)
        t_rollout = time.perf_counter() - t0
        if self.should_stop():
            raise StepAbandoned
        self.dist.enter("train", step)

        # 3. recompute anchor π_θ′ (MiniRL, *-recompute): one no-grad forward before the first update, timed apart
        t1 = time.perf_counter()
        if m.needs_old_logp:
            batch.old_logp = torch.cat([self._stats(b, grad=False).logp for b in batch.split(self._micro(len(batch)))])
        t_recompute = time.perf_counter() - t1

        # 4. several updates per batch over shuffled mini-batches, each the policy loss of Eq. 23
        t2 = time.perf_counter()
        pooled, first, grad_norms, entropy = self._updates(batch, step, mask)
        t_train = time.perf_counter() - t2
        t_step = time.perf_counter() - t0

        # 5. the step's record (names and meanings: dppo.metrics)
        rec = self._record(step, rewards, correct, mask, finished, adv, entropy)
        rec["reward/bad"] = float(n_bad)
        rec["rollout/lag"] = float(step - self.history.version_for(step)) if self.history is not None else 0.0
        rec["time/sync"] = self._sync_seconds
        if cfg.rollout.async_rollout:
            rec["time/rollout_worker"] = self._worker_seconds
        rec.update({f"loss/{k}": v for k, v in pooled.items()})
        # the first mini-batch runs before any update, with the engine's weights: its π − μ is the
        # training–inference mismatch alone (precision, kernels, misaligned pipelines), without policy drift
        rec.update({f"mismatch/{k}": first[k] for k in ("abs_diff_mean", "abs_diff_max", "abs_dlogp_mean")})
        tokens = float(mask.sum())
        rec.update({"grad_norm": sum(grad_norms) / len(grad_norms), "grad_norm_max": max(grad_norms),
                    "lr": self.scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s": tokens / t_step,
                    "time/rollout": t_rollout, "time/recompute": t_recompute, "time/train": t_train,
                    "time/step": t_step})
        return rec

    def rollout(self, step: int) -> tuple[Rollout, list, list[str]]:
        """Step ``step``'s rollout: (Rollout, the prompt of each response, the decoded responses), sampled with the
        policy of the start of step max(step − k, 0) (k = ``--rollout_lag``; 0: the current weights). A pure function
        of (seed, step, those weights); each prompt's responses of (seed, step, its index)."""
        g = self.cfg.rollout.group_size
        examples, ids, mask, seeds = self._batch_inputs(step)
        self.dist.enter("weight sync", step)  # [dist] gathers of the sharded policy: collectives
        t0 = time.perf_counter()
        if self.history is not None:
            self.history.push(step, self.model)  # w_step, before this step's first update ([dist] a collective)
        if self.cfg.rollout.async_rollout:
            pending = self._inflight.pop(step, None) or self._submit(step, ids, mask, seeds)
            if step + 1 < self.cfg.steps:  # sampled by the worker while this step trains: w_{step+1−k} is known now
                self._inflight[step + 1] = self._submit(step + 1, *self._batch_inputs(step + 1)[1:])
            self._sync_seconds = time.perf_counter() - t0  # the snapshot; the worker loads it while it samples
            self.dist.enter("rollout", step)
            ro = self.engine.result(pending, self.cfg.device)
            self._worker_seconds = pending.seconds
        else:
            self._engine_weights(step)
            self._sync_seconds = time.perf_counter() - t0  # [dist] the gather of the sharded policy included
            self.dist.enter("rollout", step)  # [dist] this process alone, until arrive("rollout") in step()
            try:
                ro = self.engine.generate(ids, mask, self.sampling, num_samples=g, seeds=seeds)
            except Exception as e:  # noqa: BLE001 - any engine failure stops the run, named
                raise RolloutEngineError(f"the {self.cfg.rollout.engine} rollout engine failed while sampling step "
                                         f"{step + 1}'s batch: {type(e).__name__}: {e}") from e
            self.engine.sleep()  # vLLM's sleep mode: KV cache (and weights) released while the policy trains
        per_response = [ex for ex in examples for _ in range(g)]
        return ro, per_response, decode_responses(self.tok, ro)

    def _batch_inputs(self, step: int) -> tuple[list, torch.Tensor, torch.Tensor, list[int]]:
        """This process's prompts of step ``step`` (whole groups, padded as all of them), their ids and mask, and
        their per-prompt seeds (per prompt, not per process: the same samples for any process count)."""
        cfg = self.cfg
        examples = self.task.train_examples(step, cfg.rollout.prompts_per_step, cfg.seed)
        ids, mask = encode_prompts(self.tok, [e.prompt for e in examples],
                                   cfg.task.chat_template and self.task.use_chat_template, cfg.device)
        mine = self.dist.share(len(examples))  # [dist] this process's share
        seeds = prompt_seeds(seed_of(cfg.seed, "rollout", step), len(examples))[mine]
        return examples[mine], ids[mine], mask[mine], seeds

    def _engine_weights(self, step: int) -> None:
        """Give the in-process engine the weights step ``step`` samples with: the policy's (k = 0) or w_{step−k}."""
        if self.history is None:
            self.engine.sync(self.model)
            return
        v = self.history.version_for(step)
        if self._engine_version != v or self.engine.needs_weights:  # a level-2 sleep discarded them
            self.engine.load_weights(self.history.weights(v))
            self._engine_version = v

    def _submit(self, step: int, ids: torch.Tensor, mask: torch.Tensor, seeds: list[int]):
        """Queue step ``step``'s batch on the rollout worker, with w_{step−k} (--async_rollout)."""
        v = self.history.version_for(step)
        self.engine.load_weights(self.history.weights(v), version=v)
        return self.engine.submit(ids, mask, self.sampling, num_samples=self.cfg.rollout.group_size, seeds=seeds,
                                  what=f"sampling step {step + 1}'s batch")

    def logp(self, ro: Rollout) -> torch.Tensor:
        """[N, T] log π_θ(a_t) of the current policy on a rollout's responses (no grad)."""
        b = Batch.from_rollout(ro, torch.zeros(ro.response_ids.shape[0], device=ro.response_ids.device))
        return self._stats(b, grad=False).logp

    def _updates(self, batch: Batch, step: int, mask: torch.Tensor) -> tuple[dict, dict, list[float], float]:
        """``epochs`` × ``minibatches`` AdamW updates; returns (pooled loss metrics, the first mini-batch's, the
        gradient norms, the mean entropy over every token the updates saw). ``mask``: the whole batch's response
        mask ([dist] ``batch`` holds this process's rows of it)."""
        cfg, m = self.cfg, self.method
        shuffle = torch.Generator().manual_seed(seed_of(cfg.seed, "shuffle", step))
        pool, first = MetricPool(), MetricPool()
        grad_norms, ent_sum, ent_tok = [], 0.0, 0.0
        mb_size = len(mask) // cfg.optim.minibatches
        for epoch in range(cfg.optim.epochs):
            for k, rows in enumerate(torch.randperm(len(mask), generator=shuffle).split(mb_size)):
                self.optimizer.zero_grad(set_to_none=True)
                # the mini-batch's aggregation denominator for every micro-batch: their losses sum to its loss exactly
                den = aggregation_denominator(mask[rows], m.aggregation, m.max_len_norm)
                # [dist] this process's rows of the mini-batch, in as many pieces as on the busiest process
                for b, real in self.dist.micro_batches(batch, rows, cfg.optim.micro_batch_size):
                    loss, met, entropy = self._loss(b, den)
                    if not self.dist.all_true(torch.isfinite(loss)):  # [dist] every process stops, or none
                        where = f"{loss.item()}" if not torch.isfinite(loss) else "not finite on another process"
                        raise NonFiniteError(f"loss is {where} at step {step + 1} (mini-batch {k + 1})")
                    loss.backward()
                    self.dist.beat()  # [dist] progress for the watchdog
                    if not real:  # [dist] a padding piece: zero loss, no metrics
                        continue
                    pool.add(met, n_seqs=b.n_seqs())
                    if epoch == 0 and k == 0:
                        first.add(met, n_seqs=b.n_seqs())
                    ent_sum += entropy * met["tokens"]
                    ent_tok += met["tokens"]
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
                gn = self.dist.value(torch.nn.utils.clip_grad_norm_(self.params, clip))  # [dist] a DTensor
                if not torch.isfinite(gn):
                    raise NonFiniteError(f"gradient norm is {gn.item()} at step {step + 1} (mini-batch {k + 1})")
                grad_norms.append(float(gn))
                self.optimizer.step()
                self.scheduler.step()
        pool, first = self.dist.merge(pool), self.dist.merge(first)  # [dist] every process's calls, pooled
        ent_sum, ent_tok = self.dist.sum(ent_sum, ent_tok)
        return (pool.result(n_updates=len(grad_norms)), first.result(n_updates=1), grad_norms,
                ent_sum / max(ent_tok, 1.0))

    def _record(self, step, rewards, correct, mask, finished, adv, entropy) -> dict:
        """The step's figures from the whole batch's per-response rewards, correctness, masks and EOS flags."""
        g = self.cfg.rollout.group_size
        groups = rewards.view(-1, g)
        n = rewards.shape[0]
        return {
            "step": step + 1,
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "accuracy": float(correct.sum()) / n,
            "groups_all_equal": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "response_len": float(mask.sum()) / n,
            "truncated_frac": float((~finished).float().mean()),
            "entropy": entropy,
            "adv_abs_mean": float(adv.abs().mean()),
        }

    def _loss(self, b: Batch, den: torch.Tensor) -> tuple[torch.Tensor, dict, float]:
        """(loss, metrics, mean entropy) of one micro-batch: the fused statistics + loss of
        :func:`dppo.policy_loss_from_hidden` from the final hidden states where the head is plain h·Wᵀ + b (3 GEMMs
        of N·V·H, no [N, V] tensor), else :func:`dppo.policy_loss` on the log-probs of ``response_stats``."""
        m = self.method
        if self.head is None:
            st = self._stats(b, grad=True)
            loss, met = policy_loss(m, st.logp, b.rollout_logp, b.advantages, b.response_mask, old_logp=b.old_logp,
                                    topk=b.topk(st.gathered_logp), denominator=den)
            resp = b.response_mask
            return loss, met, float((st.entropy.detach() * resp).sum() / resp.sum().clamp(min=1))
        # [dist] under FSDP2 inside the root's forward, which gathers the head and embedding
        loss, met = self.dist.forward(self._fused_loss, self.model, b, den)
        return loss, met, met.pop("entropy")

    def _fused_loss(self, model, b: Batch, den: torch.Tensor) -> tuple[torch.Tensor, dict]:
        body, head = self.head
        share = b.prompt_index if self.cfg.optim.share_prompts and can_share_prompts(model) else None
        autocast = torch.autocast(b.input_ids.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with training_mode(self.train_modules), autocast:
            hidden = response_hidden_states(body, b.input_ids, b.attention_mask, b.response_ids.shape[1], share)
        topk = self.method.needs_topk
        return policy_loss_from_hidden(
            self.method, hidden.to(head.weight.dtype), head.weight, b.response_ids, b.rollout_logp, b.advantages,
            b.response_mask, bias=head.bias, temperature=self.cfg.rollout.temperature, old_logp=b.old_logp,
            rollout_topk_ids=b.rollout_topk_ids if topk else None, rollout_topk_logp=b.rollout_topk_logp if topk
            else None, denominator=den, entropy=True)

    def _micro(self, n: int) -> int:
        return self.cfg.optim.micro_batch_size or n

    def _stats(self, b: Batch, *, grad: bool):
        gather = b.rollout_topk_ids if self.method.needs_topk else None
        modes = training_mode(self.train_modules) if grad else nullcontext()
        with torch.set_grad_enabled(grad), modes:
            # [dist] under FSDP2 inside the root's forward, which gathers the head and embedding
            return self.dist.forward(response_stats, self.model, b.input_ids, b.attention_mask, b.response_ids,
                                     temperature=self.cfg.rollout.temperature, gather_ids=gather, entropy=True,
                                     autocast_dtype=self.autocast,
                                     prompt_index=b.prompt_index if self.cfg.optim.share_prompts else None)

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        t = time.perf_counter()
        ec = self.cfg.eval
        self.dist.enter("weight sync", step - 1 if step else None)
        self.engine.sync(self.model)
        self._engine_version = None
        out = evaluate(self.engine, self.tok, self.task, max_new_tokens=self.max_new_tokens,
                       temperature=ec.temperature, top_p=ec.top_p, samples=ec.samples,
                       seed=seed_of(seed_of(self.cfg.seed, step), "eval"), device=self.cfg.device,
                       chat_template=self.cfg.task.chat_template, max_problems=ec.max_problems,
                       dist=self.dist if self.dist.active else None)  # [dist] each process its share of problems
        self.engine.sleep()
        out["time/eval"] = time.perf_counter() - t
        return out

    def save(self, step: int) -> str:
        # [dist] one process: state.pt (dppo.checkpoint); torchrun: sharded (dppo.checkpoint.sharded)
        self.dist.enter("checkpoint", step - 1)
        extra = {"model_path": self.model_path}
        if self.history is not None:  # the earlier policies later steps still sample with (--rollout_lag)
            extra["rollout_weights"] = self.history.state(step)
        return self.dist.save(self.cfg.out, step=step, model=self.model, optimizer=self.optimizer,
                              scheduler=self.scheduler, data_position=step * self.cfg.rollout.prompts_per_step,
                              extra=extra, keep=self.cfg.log.keep_checkpoints)

    def restore(self, state: dict) -> None:
        """After a checkpoint of ``state["step"]`` steps was loaded into the model and optimizer: the rest of the
        trainer's state (the snapshots a stale rollout samples with)."""
        if self.history is not None:
            weights = state.get("extra", {}).get("rollout_weights")
            if weights is None:
                raise ConfigError(f"the checkpoint of step {state['step']} in {self.cfg.out} was written without "
                                  f"--rollout_lag / --async_rollout, so it holds no earlier policies to sample with")
            self.history.load(weights, int(state["step"]))

    def close(self) -> None:
        """Free the engine (vLLM's KV cache and process state; the rollout worker process)."""
        self._inflight.clear()
        if hasattr(self.engine, "close"):
            self.engine.close()
