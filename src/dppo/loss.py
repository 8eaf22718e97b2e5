"""The policy loss: a pure function from one batch of per-token tensors to (loss, metrics).

Reads top to bottom like App. C.1 of arXiv 2602.04879, in two pure steps:

    ℓ_t   = token_loss(method, log π_θ(a_t), context_t)      per token, elementwise (:mod:`dppo.token_loss`, composing
                                                            the method's parts: mask, cap, gates, form, penalty)
    w_t   = aggregation_weights(response_mask, mode)         per token: loss = Σ_t w_t · ℓ_t for every aggregation
    loss  = Σ_t w_t ℓ_t                                      e.g. IS (Eq. 23): ℓ_t = −Â_t·sg(min(r_t, C))·M_t·log π_θ

The metrics it returns, their meanings and how the trainer pools them: :data:`dppo.metrics.LOSS_METRICS`.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from dppo._checks import check_policy_batch, check_same_shape
from dppo.aggregation import aggregate, aggregation_denominator, aggregation_weights, check_denominator
from dppo.methods import Method, get_method
from dppo.metrics import LOSS_METRICS, loss_metrics
from dppo.parts import MAX_LOG_RATIO
from dppo.token_loss import sequence_gate, token_context, token_loss

__all__ = ["policy_loss", "TopK", "aggregate", "aggregation_denominator", "aggregation_weights", "METRIC_KEYS",
           "MAX_LOG_RATIO"]

METRIC_KEYS = tuple(LOSS_METRICS)  # the names policy_loss returns, in order (listed in dppo.metrics)


class TopK(NamedTuple):
    """What a Top-K estimator (Eqs. 15–16) needs beside log π(a_t) and log μ(a_t), at the rollout's top-K ids.

    Shapes [B, T, K] (``sampled_in`` [B, T]); only the mask reads them (no gradient flows through them)."""

    logp: Tensor  # log π_θ at rollout_topk_ids (the trainer's policy; e.g. ``token_stats(..., gather_ids=...)``)
    rollout_logp: Tensor  # log μ at rollout_topk_ids, as the engine recorded them
    sampled_in: Tensor  # bool: a_t is among rollout_topk_ids (``Rollout.sampled_in_topk``)


def policy_loss(
    method: Method | str,
    logp: Tensor,
    rollout_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    old_logp: Tensor | None = None,
    topk: TopK | None = None,
    logp_at_rollout_topk: Tensor | None = None,
    rollout_topk_logp: Tensor | None = None,
    sampled_in_topk: Tensor | None = None,
    denominator: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    topk_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Policy loss of ``method`` on one batch (Eq. 23; module docstring for the steps).

    Args:
        method: a :class:`dppo.Method`, a preset name from :data:`dppo.PRESETS`, or a ``NAME@field=value`` spec.
        logp: [B, T] log π_θ(a_t|s_t), differentiable; any float dtype (the loss is computed in fp32).
        rollout_logp: [B, T] log μ(a_t|s_t) recorded by the inference engine at sampling time.
        advantages: [B] (per sequence, broadcast over tokens) or [B, T].
        response_mask: [B, T] bool or 0/1; 0 marks prompt/padding tokens.
        old_logp: [B, T] log π_θ′(a_t|s_t), the trainer's recomputed log-probs before the update; needed by
            ``method.needs_old_logp`` (anchor="recompute": MiniRL, DPPO-*-recompute, IcePop, VACO).
        topk: a :class:`TopK` record (log π_θ and log μ at the rollout's top-K ids, and whether a_t is among them);
            needed by top-K estimators. Only used for the mask (no gradient flows through it).
        logp_at_rollout_topk, rollout_topk_logp, sampled_in_topk: the same three tensors as keywords (``topk`` or
            these): log π_θ and log μ at the *rollout's* top-K ids [B, T, K], and whether a_t is among them [B, T].
        topk_logp: deprecated name of ``logp_at_rollout_topk`` (not :attr:`dppo.TokenStats.topk_logp`, which is
            log π at π's own top-K).
        denominator: for gradient accumulation, the aggregation denominator of the whole mini-batch this call sees
            a micro-batch of (:func:`aggregation_denominator` on its response mask); the micro-batch losses then sum
            to the mini-batch loss exactly. None = this batch's own. Metrics stay per call.
        token_weights: [B, T] per-token aggregation weights that replace the method's aggregation (and
            ``denominator``): loss = Σ_t w_t·ℓ_t. For a host trainer that aggregates its own way (verl's
            ``agg_loss`` with its global-batch normalisation, :mod:`dppo.integrations.verl`); padding should get 0.
    Returns:
        (loss, metrics): a 0-dim float32 tensor (float64 for float64 ``logp``) to call ``.backward()`` on, and a
        dict of floats (:data:`dppo.metrics.LOSS_METRICS`).
    """
    m = get_method(method)
    if topk_logp is not None:
        if logp_at_rollout_topk is not None:
            raise ValueError("pass logp_at_rollout_topk, not also its deprecated name topk_logp")
        warnings.warn("policy_loss(topk_logp=) is deprecated: pass logp_at_rollout_topk= (log π_θ at the rollout's "
                      "top-K ids), or topk=TopK(...)", DeprecationWarning, stacklevel=2)
        logp_at_rollout_topk = topk_logp
    if topk is not None:
        if logp_at_rollout_topk is not None or rollout_topk_logp is not None or sampled_in_topk is not None:
            raise ValueError("pass the top-K inputs either as topk=TopK(...) or as the three keywords, not both")
        logp_at_rollout_topk, rollout_topk_logp, sampled_in_topk = topk
    check_policy_batch(m, logp, rollout_logp, advantages, response_mask, old_logp, logp_at_rollout_topk,
                       rollout_topk_logp, sampled_in_topk)
    check_denominator(denominator)
    resp = response_mask.bool()
    # fp32 at least (bf16/fp16 inputs are upcast); float64 inputs stay float64 so gradcheck can verify the paths.
    dt = torch.promote_types(logp.dtype, torch.float32)
    ctx = token_context(m, rollout_logp, advantages, old_logp, rollout_topk_logp, sampled_in_topk, dt)
    if logp_at_rollout_topk is not None:
        ctx = ctx._replace(logp_at_rollout_topk=logp_at_rollout_topk.detach().float())
    lp_d = logp.detach().to(dt)
    seq_keep, seq_over = sequence_gate(m, lp_d, ctx, old_logp, resp)
    ctx = ctx._replace(seq_keep=seq_keep)
    terms = token_loss(m, logp, ctx)
    if token_weights is not None:
        if denominator is not None:
            raise ValueError("pass token_weights or denominator, not both (the weights carry the normalisation)")
        check_same_shape("logp", logp, token_weights=token_weights)
        w = token_weights.detach().to(dt).masked_fill(~resp, 0.0)
    else:
        w = aggregation_weights(resp, m.aggregation, m.max_len_norm, denominator, dt)
    loss = (terms.loss.masked_fill(~resp, 0.0) * w).sum()
    return loss, loss_metrics(m, loss, lp_d, ctx, terms, seq_over, resp)
