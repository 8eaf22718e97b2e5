"""The shipped trainer's first RL step, opened up for the figure scripts (fig2_mismatch.py, topk_gap.py).

Builds :class:`dppo.run.trainer.Trainer` from the same flags as ``dppo train`` (by default the miniature of
``experiments/miniature.toml``), samples its step-0 rollout batch with μ's whole distribution recorded
(``SamplingParams(record_logp=True)``), scores it with the task's reward, computes the advantages the trainer would,
and runs the trainer's own mini-batch updates on it. Imports only the library.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from dppo.advantages import group_advantages
from dppo.hf.model import position_ids_from_mask
from dppo.run.batch import Batch
from dppo.run.cli import parse_config
from dppo.run.trainer import Trainer
from dppo.tasks.scoring import score

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "experiments" / "miniature.toml"

__all__ = ["ROOT", "MINIATURE", "make_trainer", "first_batch", "policy_logits", "update"]


def make_trainer(argv: list[str], method: str) -> Trainer:
    """A Trainer for ``dppo train --config experiments/miniature.toml ARGV --method METHOD`` (an --config in ARGV
    replaces the miniature), writing nothing but the cached warm-up."""
    if "--config" not in argv:
        argv = ["--config", str(MINIATURE), *argv]
    cfg = parse_config([*argv, "--method", method, "--out", tempfile.mkdtemp(prefix="dppo-fig-")])
    tr = Trainer(cfg, log=lambda msg: print(msg, flush=True))
    tr.sampling = dataclasses.replace(tr.sampling, record_logp=True)  # μ's [N, T, V] log-probs for exact divergences
    os.rmdir(cfg.out)
    return tr


def first_batch(tr: Trainer, step: int = 0) -> dict:
    """Step ``step``'s rollout as the trainer samples it: ``ro`` (Rollout with ``rollout_full_logp``), the prompt of
    each response, the decoded responses, rewards [N] and the group advantages Â [N] the trainer uses."""
    ro, per_response, texts = tr.rollout(step)
    rewards, _ = score(tr.task, per_response, texts)
    adv = group_advantages(rewards, tr.cfg.rollout.group_size, scale=tr.cfg.method.adv_scale)
    return dict(ro=ro, per_response=per_response, texts=texts, rewards=rewards, adv=adv)


@torch.no_grad()
def policy_logits(tr: Trainer, ro) -> torch.Tensor:
    """[N, T, V] fp32 logits of the trainer's current (fp32) policy at every response position, at the rollout
    temperature."""
    t = ro.response_ids.shape[1]
    out = tr.model(input_ids=ro.input_ids, attention_mask=ro.attention_mask.long(),
                   position_ids=position_ids_from_mask(ro.attention_mask)).logits
    return out[:, -t - 1: -1].float() / tr.cfg.rollout.temperature


def update(tr: Trainer, batch: dict, step: int = 0) -> None:
    """The trainer's own ``epochs × minibatches`` updates of step ``step`` on this batch (Trainer._updates)."""
    ro = batch["ro"]
    tr._updates(Batch.from_rollout(ro, batch["adv"], tr.cfg.rollout.group_size), step, ro.response_mask)
