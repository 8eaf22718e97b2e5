"""The default job's starting point: a tiny transformers model given a short supervised warm-up on a built-in task
(``arithmetic``, or ``addition-steps``; any task with an ``alphabet`` and a ``demonstration`` method), so RL starts
from a policy that sometimes succeeds (RL from a random 1 M-parameter model would see reward 0).

The result is saved with ``save_pretrained`` (model + tokenizer) in a cache directory keyed by a hash of everything
that determines it, and the trainer loads it exactly like a user's ``--model PATH``. A second run skips the warm-up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time

import torch

from dppo.hf.model import build_char_tokenizer, build_tiny_model
from dppo.run.config import ModelConfig
from dppo.tasks import TINY_MODEL_TASKS, make_task
from dppo.tasks.base import step_rng

__all__ = ["warm_start", "warm_start_for", "default_cache_dir"]

WARMUP_VERSION = 1  # bump when the warm-up recipe changes, so old caches are not reused


def default_cache_dir() -> str:
    return os.environ.get("DPPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dppo")


def _key(mc: ModelConfig, digits: int, eval_per_level: int, seed: int, task: str) -> dict:
    key = dict(version=WARMUP_VERSION, arch=mc.arch, hidden=mc.hidden, layers=mc.layers, heads=mc.heads,
               digits=digits, eval_per_level=eval_per_level, steps=mc.warmup_steps, lr=mc.warmup_lr,
               batch=mc.warmup_batch, noise=mc.warmup_noise, seed=seed, torch=torch.__version__.split("+")[0])
    if mc.vocab_pad:  # absent for the default, so caches written before the option existed stay valid
        key["vocab_pad"] = mc.vocab_pad
    if task != "arithmetic":  # likewise
        key["task"] = task
    return key


def warm_start(mc: ModelConfig, *, digits: int, eval_per_level: int, seed: int, task: str = "arithmetic",
               log=print) -> str:
    """Directory of the warmed-up tiny model described by ``mc`` (:class:`dppo.run.config.ModelConfig`) for the
    built-in ``task`` with ``digits``; trains it if no cached copy exists. Supervised fine-tuning: cross-entropy on the
    response and <eos> tokens of ``prompt+response``, the response being the task's ``demonstration`` (a teacher who
    slips with probability ``mc.warmup_noise``). ``seed``: the run's seed, unless ``mc.warmup_seed`` is set."""
    if task not in TINY_MODEL_TASKS:
        raise ValueError(f"the tiny model's warm-up knows the tasks {TINY_MODEL_TASKS}, not {task!r}")
    seed = seed if mc.warmup_seed is None else mc.warmup_seed
    key = _key(mc, digits, eval_per_level, seed, task)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = mc.cache_dir or default_cache_dir()
    path = os.path.join(root, f"warmup-{digest}")
    if os.path.isfile(os.path.join(path, "warmup.json")):
        log(f"warm-up: cached at {path}")
        return path

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tk = make_task(task, digits=digits, eval_per_level=eval_per_level)
    tok = build_char_tokenizer(tk.alphabet, mc.vocab_pad)
    max_len = 2 * digits + 3 + tk.max_new_tokens_hint  # <bos> a + b = | response <eos>
    model = build_tiny_model(len(tok), arch=mc.arch, hidden_size=mc.hidden, num_layers=mc.layers,
                             num_heads=mc.heads, max_positions=max(64, 2 * max_len),
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    model.generation_config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=mc.warmup_lr, weight_decay=0.0)
    n = mc.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n) / max(n, 1))))
    model.train()
    loss_v = float("nan")
    for step in range(n):
        rng = step_rng(seed, step, "warmup")
        exs = [tk.sample(rng) for _ in range(mc.warmup_batch)]
        prompts = tok([e.prompt for e in exs])["input_ids"]
        demos = [tk.demonstration(e, rng, mc.warmup_noise) for e in exs]
        answers = tok(demos, add_special_tokens=False)["input_ids"]
        seqs = [p + a + [tok.eos_token_id] for p, a in zip(prompts, answers)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            labels[i, len(p): len(s)] = torch.tensor(s[len(p):])  # loss on the answer and <eos> only
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = loss.item()
        if (step + 1) % max(1, n // 5) == 0:
            log(f"warm-up: step {step + 1}/{n}  loss {loss_v:.3f}")
    model.eval()
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "warmup.json"), "w") as f:
        json.dump(dict(key=key, final_loss=loss_v, seconds=time.perf_counter() - t0), f, indent=2)
    if os.path.isfile(os.path.join(path, "warmup.json")):  # another process finished the same warm-up first
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    shutil.rmtree(path, ignore_errors=True)  # a torn entry (no warmup.json)
    try:
        os.replace(tmp, path)  # atomic: a killed warm-up leaves no half-written cache entry
    except OSError:  # lost the race to a concurrent writer of the same key: theirs is the same model
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "warmup.json")):
            raise
    log(f"warm-up: {n} steps in {time.perf_counter() - t0:.1f}s, saved to {path}")
    return path


def warm_start_for(cfg, log=print) -> str:
    """:func:`warm_start` for a whole :class:`dppo.run.config.TrainConfig` (its model, task and seed)."""
    return warm_start(cfg.model, digits=cfg.task.digits, eval_per_level=cfg.task.eval_per_level, seed=cfg.seed,
                      task=cfg.task.name, log=log)
