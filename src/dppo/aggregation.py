"""Aggregation: how per-token losses ℓ [B, T] become one scalar, as per-token weights w with loss = Σ_{b,t} w·ℓ.

Shared by :func:`dppo.policy_loss` and :func:`dppo.policy_loss_from_hidden` (which needs the weights before the loss,
to scale each token's gradient tile by tile). The modes are verl's ``agg_loss`` modes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["AGGREGATIONS", "aggregate", "aggregation_denominator", "aggregation_weights", "check_denominator"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum")


def aggregation_denominator(response_mask: Tensor, mode: str, max_len_norm: int | None = None) -> Tensor:
    """The denominator of :func:`aggregate` for a batch (0-dim fp32 tensor): Σ m (token-mean), the number of
    sequences with ≥ 1 token (seq-mean-token-mean), B·L (seq-mean-token-sum-norm), 1 (sum); at least 1.

    Gradient accumulation: compute it once on the whole mini-batch's mask and pass it as ``denominator`` to the loss
    of every micro-batch; the micro-batch losses then sum to the mini-batch loss exactly, in every mode (weighting
    micro-batch means by their share of sequences is exact only for the modes with a constant denominator)."""
    m = response_mask.float()
    if mode == "token-mean":
        den = m.sum()
    elif mode == "seq-mean-token-mean":
        den = (m.sum(dim=-1) > 0).float().sum()
    elif mode == "seq-mean-token-sum-norm":
        length = max_len_norm if max_len_norm is not None else m.shape[-1]
        den = torch.tensor(float(m.shape[0] * max(length, 1)), device=m.device)
    elif mode == "sum":
        den = torch.ones((), device=m.device)
    else:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    return den.clamp(min=1.0)


def aggregation_weights(
    response_mask: Tensor, mode: str, max_len_norm: int | None = None, denominator: Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-token weights w [B, T] with aggregate(ℓ) = Σ_{b,t} w_{b,t} · ℓ_{b,t} for every mode:

    * ``"token-mean"``, ``"seq-mean-token-sum-norm"``, ``"sum"``: w = m / den
    * ``"seq-mean-token-mean"``: w = m / (max(n_b, 1) · den), n_b = Σ_t m_{b,t} (the tokens of sequence b)

    with m the response mask and den :func:`aggregation_denominator` (or the given ``denominator``). Padding gets 0.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    m = response_mask.to(dtype)
    if mode == "seq-mean-token-mean":
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=1.0)  # empty rows add 0
    if denominator is None:
        denominator = aggregation_denominator(response_mask, mode, max_len_norm)
    return m / torch.as_tensor(denominator, dtype=dtype, device=m.device)


def aggregate(
    token_loss: Tensor, response_mask: Tensor, mode: str, max_len_norm: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Reduce [B, T] token losses to a scalar (verl's ``agg_loss`` modes), Σ_{b,t} w_{b,t}·ℓ_{b,t} with
    :func:`aggregation_weights`, i.e. numerator / denominator:

    * ``"token-mean"``:  Σ_{b,t} ℓ·m / Σ_{b,t} m  (DAPO; every token of the batch weighs the same)
    * ``"seq-mean-token-mean"``: Σ_b (Σ_t ℓ·m / Σ_t m) / #{b : Σ_t m > 0}  (original GRPO)
    * ``"seq-mean-token-sum-norm"``: Σ_{b,t} ℓ·m / (B · L), L = ``max_len_norm`` or T  (Dr.GRPO; the paper's
      authors' setup: loss_agg_mode=seq-mean-token-sum-norm in their verl recipe, examples/dppo_trainer)
    * ``"sum"``: Σ_{b,t} ℓ·m

    ``denominator``: None = this batch's own (:func:`aggregation_denominator`); a micro-batch of a larger batch
    passes the whole batch's, so that the micro-batch losses add up to the batch loss. An all-masked batch gives 0
    with a finite (zero) gradient.
    """
    return (token_loss * aggregation_weights(response_mask, mode, max_len_norm, denominator, token_loss.dtype)).sum()


def check_denominator(denominator: Tensor | float | None) -> None:
    """A given aggregation denominator must be a finite number > 0 (named error otherwise)."""
    if denominator is not None:
        den = float(denominator)
        if not (math.isfinite(den) and den > 0):
            raise ValueError(f"denominator must be a finite number > 0 (the mini-batch's aggregation_denominator), "
                             f"got {den}")
