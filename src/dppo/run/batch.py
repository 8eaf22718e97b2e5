"""The training batch of one RL step: the rollout's per-row tensors with their advantages (and the recomputed anchor
when a method needs it), sliced into mini- and micro-batches by row. μ's tensors keep their ``rollout_*`` names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from dppo.loss import TopK
from dppo.rollout import Rollout

__all__ = ["Batch"]


@dataclass
class Batch:
    input_ids: Tensor  # [N, P+T] prompt | response
    attention_mask: Tensor  # [N, P+T] bool
    response_ids: Tensor  # [N, T]
    response_mask: Tensor  # [N, T] bool
    rollout_logp: Tensor  # [N, T] log μ(a_t)
    advantages: Tensor  # [N] Â
    prompt_index: Tensor | None = None  # [N] int: rows with equal values share their prompt (a group)
    rollout_topk_ids: Tensor | None = None  # [N, T, K]
    rollout_topk_logp: Tensor | None = None  # [N, T, K] log μ at rollout_topk_ids
    old_logp: Tensor | None = None  # [N, T] log π_θ′(a_t), the recomputed anchor (anchor="recompute" methods)

    @classmethod
    def from_rollout(cls, ro: Rollout, advantages: Tensor, group_size: int = 1) -> "Batch":
        """The rollout's rows (each prompt's ``group_size`` samples contiguous) with their advantages."""
        n = ro.response_ids.shape[0]
        prompt_index = torch.arange(n, device=ro.response_ids.device) // group_size
        return cls(ro.input_ids, ro.attention_mask, ro.response_ids, ro.response_mask, ro.rollout_logp, advantages,
                   prompt_index, ro.rollout_topk_ids, ro.rollout_topk_logp)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def rows(self, idx: Tensor) -> "Batch":
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v[idx]
                        for f in dataclasses.fields(self)})

    def topk(self, topk_logp: Tensor | None) -> TopK | None:
        """The Top-K estimators' inputs, given log π_θ at ``rollout_topk_ids`` (None when there is no top-K)."""
        if topk_logp is None:
            return None
        sampled_in = (self.rollout_topk_ids == self.response_ids[..., None]).any(-1)
        return TopK(topk_logp, self.rollout_topk_logp, sampled_in)

    def n_seqs(self) -> float:
        """Sequences with at least one response token."""
        return float((self.response_mask.sum(-1) > 0).sum())

    def split(self, size: int, order: Tensor | None = None) -> list["Batch"]:
        """Consecutive pieces of ``size`` rows (in ``order`` if given)."""
        order = torch.arange(len(self)) if order is None else order
        return [self.rows(order[i: i + size]) for i in range(0, len(order), size)]
