"""Input validation shared by the public functions: every failure names the argument and the problem."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dppo.methods import Method

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
    ref_name: str, ref: Tensor, logp_at_rollout_topk: Tensor, rollout_topk_logp: Tensor, sampled_in_topk: Tensor
) -> None:
    """The top-K inputs of a Top-K estimator: log π and log μ at the rollout's top-K ids ([..., K], same K) and
    whether a_t is among them (bool, like ``ref``)."""
    check_logp("logp_at_rollout_topk", logp_at_rollout_topk)
    check_logp("rollout_topk_logp", rollout_topk_logp)
    check_tensor("sampled_in_topk", sampled_in_topk)
    if sampled_in_topk.dtype != torch.bool:
        raise TypeError(f"sampled_in_topk must be a bool tensor, got {sampled_in_topk.dtype}")
    if logp_at_rollout_topk.shape != rollout_topk_logp.shape:
        raise ValueError(
            f"logp_at_rollout_topk has shape {tuple(logp_at_rollout_topk.shape)} but rollout_topk_logp has shape "
            f"{tuple(rollout_topk_logp.shape)}: both must be [..., K] with the same K (log π and log μ at the same "
            "ids)"
        )
    if logp_at_rollout_topk.dim() != ref.dim() + 1 or logp_at_rollout_topk.shape[:-1] != ref.shape:
        raise ValueError(
            f"logp_at_rollout_topk has shape {tuple(logp_at_rollout_topk.shape)}; expected {tuple(ref.shape)} + (K,) "
            f"to match {ref_name}"
        )
    if logp_at_rollout_topk.shape[-1] < 1:
        raise ValueError("logp_at_rollout_topk has K = 0 entries per token; K must be >= 1")
    check_same_shape(ref_name, ref, sampled_in_topk=sampled_in_topk)


def check_policy_batch(
    m: Method,
    logp: Tensor,
    rollout_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    old_logp: Tensor | None,
    logp_at_rollout_topk: Tensor | None,
    rollout_topk_logp: Tensor | None,
    sampled_in_topk: Tensor | None,
    ref: str = "logp",
) -> None:
    """Named errors for the inputs of a policy loss; ``ref`` names the [B, T] tensor the others are checked against
    (``logp``, or ``rollout_logp`` for the fused path, which has no log π yet)."""
    check_logp(ref, logp)
    if logp.dim() != 2:
        raise ValueError(f"{ref} must be [B, T] (batch, response tokens), got shape {tuple(logp.shape)}")
    if logp.numel() == 0:
        raise ValueError(f"empty batch: {ref} has shape {tuple(logp.shape)}; need B >= 1 and T >= 1")
    check_logp("rollout_logp", rollout_logp)
    check_tensor("response_mask", response_mask)
    if response_mask.dtype != torch.bool and not response_mask.is_floating_point() and response_mask.dtype not in (
        torch.int64, torch.int32, torch.uint8, torch.int8, torch.int16
    ):
        raise TypeError(f"response_mask must be bool or 0/1 numbers, got {response_mask.dtype}")
    check_same_shape(ref, logp, rollout_logp=rollout_logp, response_mask=response_mask)
    if response_mask.dtype != torch.bool and not ((response_mask == 0) | (response_mask == 1)).all():
        raise ValueError("response_mask must hold only 0 and 1 (or be a bool tensor)")
    check_float("advantages", advantages)
    if advantages.shape != logp.shape[:1] and advantages.shape != logp.shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = {tuple(logp.shape[:1])} (one per "
            f"sequence) or [B, T] = {tuple(logp.shape)} (one per token)"
        )
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages contains NaN or inf")
    if m.needs_old_logp:
        if old_logp is None:
            raise ValueError(
                f"method {m.name!r} reads the recomputed policy π_θ′ (anchor='recompute' or a sequence gate on "
                "policy='old') and needs old_logp: pass the log-probs of the policy before this update, or use a "
                "method with anchor='rollout'"
            )
    if old_logp is not None:
        check_logp("old_logp", old_logp)
        check_same_shape(ref, logp, old_logp=old_logp)
    topk = (logp_at_rollout_topk, rollout_topk_logp, sampled_in_topk)
    if m.needs_topk and any(x is None for x in topk):
        raise ValueError(
            f"method {m.name!r} uses a top-K estimator and needs logp_at_rollout_topk, rollout_topk_logp and "
            "sampled_in_topk (record the rollout's top-K ids and log-probs, method.topk of them), or use a binary "
            "estimator"
        )
    if any(x is not None for x in topk):
        if any(x is None for x in topk):
            raise ValueError("pass all three of logp_at_rollout_topk, rollout_topk_logp and sampled_in_topk, or none "
                             "of them")
        check_topk(ref, logp, *topk)  # type: ignore[arg-type]
