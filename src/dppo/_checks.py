"""Input validation shared by the public functions: every failure names the argument and the problem."""

from __future__ import annotations

import torch
from torch import Tensor

# A log-prob may exceed 0 by rounding only (log_softmax of a near-one-hot row); anything larger is a bug upstream.
LOGP_TOLERANCE = 1e-5


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object) -> Tensor:
    x = check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16/float64), got {x.dtype}")
    return x


def check_finite(name: str, x: Tensor, *, allow_neg_inf: bool = False) -> None:
    """NaN is always rejected; +inf always; -inf only where it is a legal value (log of probability 0)."""
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    bad = torch.isposinf(x) if allow_neg_inf else torch.isinf(x)
    if bad.any():
        raise ValueError(f"{name} contains {'+inf' if allow_neg_inf else 'inf'}")


def check_logp(name: str, x: object) -> Tensor:
    """A log-probability tensor: floating, no NaN/+inf, every entry <= 0 (up to LOGP_TOLERANCE); -inf means p = 0."""
    x = check_float(name, x)
    check_finite(name, x, allow_neg_inf=True)
    if x.numel() and (x > LOGP_TOLERANCE).any():
        raise ValueError(
            f"{name} holds log-probabilities > 0 (max {x.max().item():.4g}); pass log-probs, not logits or probs"
        )
    return x


def check_same_shape(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match "
                "exactly (no broadcasting)"
            )


def check_topk(
    ref_name: str, ref: Tensor, topk_logp: Tensor, rollout_topk_logp: Tensor, sampled_in_topk: Tensor
) -> None:
    check_logp("topk_logp", topk_logp)
    check_logp("rollout_topk_logp", rollout_topk_logp)
    check_tensor("sampled_in_topk", sampled_in_topk)
    if sampled_in_topk.dtype != torch.bool:
        raise TypeError(f"sampled_in_topk must be a bool tensor, got {sampled_in_topk.dtype}")
    if topk_logp.shape != rollout_topk_logp.shape:
        raise ValueError(
            f"topk_logp has shape {tuple(topk_logp.shape)} but rollout_topk_logp has shape "
            f"{tuple(rollout_topk_logp.shape)}: both must be [..., K] with the same K (log π and log μ at the same ids)"
        )
    if topk_logp.dim() != ref.dim() + 1 or topk_logp.shape[:-1] != ref.shape:
        raise ValueError(
            f"topk_logp has shape {tuple(topk_logp.shape)}; expected {tuple(ref.shape)} + (K,) to match {ref_name}"
        )
    if topk_logp.shape[-1] < 1:
        raise ValueError("topk_logp has K = 0 entries per token; K must be >= 1")
    check_same_shape(ref_name, ref, sampled_in_topk=sampled_in_topk)
