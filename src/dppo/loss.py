"""The policy loss: a pure function from one batch of per-token tensors to (loss, metrics).

Reads top to bottom like App. C.1 of arXiv 2602.04879, in two pure steps:

    ℓ_t   = token_loss(method, log π_θ(a_t), context_t)      per token, elementwise (:mod:`dppo.token_loss`: the
                                                            ratio, the estimate D_t, the mask M_t, the cap, the
                                                            behaviour weight, the sequence gate, the loss form)
    w_t   = aggregation_weights(response_mask, mode)         per token: loss = Σ_t w_t · ℓ_t for every aggregation
    loss  = Σ_t w_t ℓ_t                                      e.g. "is" (Eq. 23): ℓ_t = −Â_t·sg(min(r_t, C))·M_t·log π_θ

Glossary of the returned metrics (floats; means over response tokens unless stated):

    loss               the aggregated scalar
    tokens             number of response tokens in the batch
    abs_diff_mean      mean |π(a_t) − μ(a_t)|    — the paper's "Mean of |π − μ|" mismatch metric (Fig. 3)
    abs_diff_max       max |π − μ|
    abs_diff_min       min |π − μ|
    abs_dlogp_mean     mean |log π(a_t) − log μ(a_t)|  (open-instruct's vllm_vs_local_logprob_diff_mean)
    diff_max, diff_min max / min of the signed π − μ (Fig. 3, "Max & Min")
    div_mean, div_max  mean / max of the estimate the token mask thresholds (for "ratio": |r_anchor − 1|; for
                       "none": Binary-TV against the anchor, as a diagnostic)
    masked_frac        fraction of tokens whose gradient the token mask removes (M_t = 0)
    masked_frac_pos    … of them with Â > 0 and π pushed above the anchor (positive side)
    masked_frac_neg    … of them with Â < 0 and π pushed below the anchor (negative side)
                       (IPO's symmetric mask also removes tokens counted in neither: π above with Â ≤ 0, …)
    ratio_mean         mean r_t = π/μ;  ratio_max: max r_t
    capped_frac        fraction of tokens with r_t > C (their weight truncated to C)
    seq_masked_frac    fraction of sequences (with ≥ 1 response token) whose sequence statistic exceeds seq_delta
                       (TRM: dropped whole; VACO: their tokens moving away are dropped)
    seq_dropped_frac   fraction of tokens the sequence gate drops
    behavior_masked_frac  fraction of tokens whose behaviour ratio b = π_θ′/μ lies outside the IcePop band (weight 0)
    behavior_capped_frac  fraction of tokens with b above behavior_cap (VACO: weight truncated to 2)
    logratio_sq_mean   mean (log π − log μ)²: IPO's penalty before its coefficient kl_coef
    entropy            mean entropy of π_θ(·|s_t) (only from :func:`dppo.policy_loss_from_hidden` with entropy=True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dppo import divergence as div
from dppo._checks import check_float, check_logp, check_same_shape, check_tensor, check_topk
from dppo.methods import Method, get_method
from dppo.token_loss import MAX_LOG_RATIO, TokenContext, TokenTerms, sequence_gate, token_loss

__all__ = ["policy_loss", "aggregate", "aggregation_denominator", "aggregation_weights", "TopK", "METRIC_KEYS",
           "MAX_LOG_RATIO"]

METRIC_KEYS = (
    "loss", "tokens", "abs_diff_mean", "abs_diff_max", "abs_diff_min", "abs_dlogp_mean", "diff_max", "diff_min",
    "div_mean", "div_max", "masked_frac", "masked_frac_pos", "masked_frac_neg", "ratio_mean", "ratio_max",
    "capped_frac", "seq_masked_frac", "seq_dropped_frac", "behavior_masked_frac", "behavior_capped_frac",
    "logratio_sq_mean",
)


class TopK(NamedTuple):
    """What a Top-K estimator (Eqs. 15–16) needs beside log π(a_t) and log μ(a_t), at the rollout's top-K ids.

    Shapes [B, T, K] (``sampled_in`` [B, T]); only the mask reads them (no gradient flows through them)."""

    logp: Tensor  # log π_θ at rollout_topk_ids (the trainer's policy; e.g. ``token_stats(..., gather_ids=...)``)
    rollout_logp: Tensor  # log μ at rollout_topk_ids, as the engine recorded them
    sampled_in: Tensor  # bool: a_t is among rollout_topk_ids (``Rollout.sampled_in_topk``)


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
        raise ValueError(f"unknown aggregation {mode!r}")
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
    if mode not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"):
        raise ValueError(f"unknown aggregation {mode!r}")
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


def _validate(
    m: Method,
    logp: Tensor,
    rollout_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    old_logp: Tensor | None,
    topk_logp: Tensor | None,
    rollout_topk_logp: Tensor | None,
    sampled_in_topk: Tensor | None,
    ref: str = "logp",
) -> None:
    """Named errors for bad inputs; ``ref`` names the [B, T] tensor the others are checked against."""
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
                f"method {m.name!r} reads the recomputed policy π_θ′ (anchor='recompute' or seq_policy='old') and needs "
                "old_logp: pass the log-probs of the policy before this update, or use a method with anchor='rollout'"
            )
    if old_logp is not None:
        check_logp("old_logp", old_logp)
        check_same_shape(ref, logp, old_logp=old_logp)
    if m.needs_topk:
        if topk_logp is None or rollout_topk_logp is None or sampled_in_topk is None:
            raise ValueError(
                f"method {m.name!r} uses a top-K estimator and needs topk_logp, rollout_topk_logp and sampled_in_topk "
                "(record the rollout's top-K ids and log-probs, method.topk of them), or use a binary estimator"
            )
    if topk_logp is not None or rollout_topk_logp is not None or sampled_in_topk is not None:
        if topk_logp is None or rollout_topk_logp is None or sampled_in_topk is None:
            raise ValueError("pass all three of topk_logp, rollout_topk_logp and sampled_in_topk, or none of them")
        check_topk(ref, logp, topk_logp, rollout_topk_logp, sampled_in_topk)


def policy_loss(
    method: Method | str,
    logp: Tensor,
    rollout_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    old_logp: Tensor | None = None,
    topk: TopK | None = None,
    topk_logp: Tensor | None = None,
    rollout_topk_logp: Tensor | None = None,
    sampled_in_topk: Tensor | None = None,
    denominator: Tensor | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Policy loss of ``method`` on one batch (Eq. 23; module docstring for the steps and the metric glossary).

    Args:
        method: a :class:`dppo.Method` or a preset name from :data:`dppo.PRESETS`.
        logp: [B, T] log π_θ(a_t|s_t), differentiable; any float dtype (the loss is computed in fp32).
        rollout_logp: [B, T] log μ(a_t|s_t) recorded by the inference engine at sampling time.
        advantages: [B] (per sequence, broadcast over tokens) or [B, T].
        response_mask: [B, T] bool or 0/1; 0 marks prompt/padding tokens.
        old_logp: [B, T] log π_θ′(a_t|s_t), the trainer's recomputed log-probs before the update; needed by
            ``method.needs_old_logp`` (anchor="recompute": MiniRL, DPPO-*-recompute, IcePop, VACO).
        topk: a :class:`TopK` record (log π_θ and log μ at the rollout's top-K ids, and whether a_t is among them);
            needed by top-K estimators. Only used for the mask (no gradient flows through it).
        topk_logp, rollout_topk_logp, sampled_in_topk: the same three tensors as keywords (``topk`` or these).
        denominator: for gradient accumulation, the aggregation denominator of the whole mini-batch this call sees
            a micro-batch of (:func:`aggregation_denominator` on its response mask); the micro-batch losses then sum
            to the mini-batch loss exactly. None = this batch's own. Metrics stay per call.
        token_weights: [B, T] per-token aggregation weights that replace the method's aggregation (and
            ``denominator``): loss = Σ_t w_t·ℓ_t. For a host trainer that aggregates its own way (verl's
            ``agg_loss`` with its global-batch normalisation, :mod:`dppo.integrations.verl`); padding should get 0.
    Returns:
        (loss, metrics): a 0-dim float32 tensor (float64 for float64 ``logp``) to call ``.backward()`` on, and a
        dict of floats (glossary above).
    """
    m = get_method(method)
    if topk is not None:
        if topk_logp is not None or rollout_topk_logp is not None or sampled_in_topk is not None:
            raise ValueError("pass the top-K inputs either as topk=TopK(...) or as the three keywords, not both")
        topk_logp, rollout_topk_logp, sampled_in_topk = topk
    _validate(m, logp, rollout_logp, advantages, response_mask, old_logp, topk_logp, rollout_topk_logp, sampled_in_topk)
    _check_denominator(denominator)
    resp = response_mask.bool()
    # fp32 at least (bf16/fp16 inputs are upcast); float64 inputs stay float64 so gradcheck can verify the paths.
    dt = torch.promote_types(logp.dtype, torch.float32)
    ctx = token_context(m, rollout_logp, advantages, old_logp, rollout_topk_logp, sampled_in_topk, dt)
    if topk_logp is not None:
        ctx = ctx._replace(topk_logp=topk_logp.detach().float())
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


def _check_denominator(denominator: Tensor | float | None) -> None:
    if denominator is not None:
        den = float(denominator)
        if not (math.isfinite(den) and den > 0):
            raise ValueError(f"denominator must be a finite number > 0 (the mini-batch's aggregation_denominator), "
                             f"got {den}")


def token_context(
    m: Method, rollout_logp: Tensor, advantages: Tensor, old_logp: Tensor | None, rollout_topk_logp: Tensor | None,
    sampled_in_topk: Tensor | None, dt: torch.dtype,
) -> TokenContext:
    """The detached per-token context of :func:`dppo.token_loss.token_loss` for a [B, T] batch (no gate yet, no
    log π_θ at the top-K ids: the caller adds them)."""
    lmu = rollout_logp.detach().to(dt)
    anchor = old_logp.detach().to(dt) if m.anchor == "recompute" else lmu  # type: ignore[union-attr]
    adv = advantages.detach().to(dt)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(lmu)
    return TokenContext(
        rollout_logp=lmu, anchor_logp=anchor, advantages=adv, seq_keep=torch.ones_like(lmu),
        rollout_topk_logp=rollout_topk_logp.detach().float() if rollout_topk_logp is not None else None,
        sampled_in=sampled_in_topk,
    )


def loss_metrics(
    m: Method, loss: Tensor, lp: Tensor, ctx: TokenContext, terms: TokenTerms, seq_over: Tensor, resp: Tensor
) -> dict[str, float]:
    """The metric glossary of the module docstring, for one batch ([B, T] tensors, ``lp`` detached)."""
    lmu, anchor, adv = ctx.rollout_logp, ctx.anchor_logp, ctx.advantages
    with torch.no_grad():
        n = resp.sum()
        denom = n.clamp(min=1).float()
        any_tok = n > 0

        def mean(x: Tensor) -> Tensor:
            return x.float().masked_fill(~resp, 0.0).sum() / denom  # padding may hold inf: fill, not multiply

        def ext(x: Tensor, largest: bool) -> Tensor:
            fill = float("-inf") if largest else float("inf")
            v = x.masked_fill(~resp, fill)
            v = v.max() if largest else v.min()
            return torch.where(any_tok, v, torch.zeros_like(v))

        diff = torch.exp(lp) - torch.exp(lmu)
        absdiff = div.binary_tv(lp, lmu)
        masked = (terms.mask == 0) & resp
        up = lp > anchor
        has_seq = resp.any(dim=-1)
        b = torch.exp((anchor - lmu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        log_r = (lp - lmu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        vals = torch.stack([
            loss.detach().float(),
            n.float(),
            mean(absdiff), ext(absdiff, True), ext(absdiff, False), mean((lp - lmu).abs()),
            ext(diff, True), ext(diff, False),
            mean(terms.estimate), ext(terms.estimate, True),
            mean(masked), mean(masked & (adv > 0) & up), mean(masked & (adv < 0) & ~up),
            mean(terms.ratio), ext(terms.ratio, True),
            mean(terms.ratio > m.ratio_cap),
            (seq_over & has_seq).float().sum() / has_seq.float().sum().clamp(min=1.0),
            mean(ctx.seq_keep == 0),
            mean((b < m.behavior_low) | (b > m.behavior_high)),
            mean(b > m.behavior_cap),
            mean(log_r**2),
        ])
        return dict(zip(METRIC_KEYS, vals.tolist()))
