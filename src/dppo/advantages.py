"""Group-relative advantages (GRPO family): one scalar per response, broadcast over its tokens by the loss."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dppo._checks import check_float

__all__ = ["group_advantages"]


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: Literal["none", "group-std", "batch-std"] = "none",
    baseline: Literal["mean", "leave-one-out"] = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Â_i = (R_i − b_i) / s_i for responses laid out as consecutive groups of ``group_size`` per prompt.

    * ``scale="none"`` (default): Â = R − mean_group(R), no standard-deviation normalisation, as in the paper
      (§2, App. C: "GRPO without standard-deviation normalisation") and Dr.GRPO (Liu et al. 2025).
    * ``scale="group-std"``: original GRPO (Shao et al. 2024), divided by the group's std (unbiased=False) + eps.
    * ``scale="batch-std"``: divided by the std of the whole batch's centred rewards + eps (REINFORCE++-style).
    * ``baseline="leave-one-out"``: b_i = mean of the *other* G−1 rewards of the group (RLOO), i.e.
      Â = G/(G−1)·(R − mean).

    Args:
        rewards: [N] float, N = (number of prompts) · group_size, each prompt's G responses contiguous.
        group_size: G ≥ 2 (a group baseline of one response is the response itself, Â ≡ 0).
    Returns:
        [N] float32. A group whose rewards are all equal gets Â = 0 (no learning signal), whatever ``scale``.
    """
    check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 for a group baseline, got {group_size!r}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards is empty")
    if n % group_size:
        raise ValueError(
            f"rewards has {n} entries, not a whole number of groups of {group_size}: pass every prompt's "
            f"{group_size} responses (N must be a multiple of group_size)"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contains NaN or inf")
    if scale not in ("none", "group-std", "batch-std"):
        raise ValueError(f"scale must be 'none', 'group-std' or 'batch-std', got {scale!r}")
    if baseline not in ("mean", "leave-one-out"):
        raise ValueError(f"baseline must be 'mean' or 'leave-one-out', got {baseline!r}")

    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if baseline == "leave-one-out":
        centred = centred * (group_size / (group_size - 1))
    if scale == "group-std":
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif scale == "batch-std":
        centred = centred / (centred.std(unbiased=False) + eps)
    return centred.reshape(-1)
