"""The policy loss: a pure function from one batch of per-token tensors to (loss, metrics).

Reads top to bottom like App. C.1 of arXiv 2602.04879:

    r_t   = π_θ(a_t) / μ(a_t)                      IS ratio against the rollout policy μ (always μ, Eq. 23)
    D_t   = estimate of D(anchor(·|s_t) ‖ π(·|s_t)) the method's estimator (binary / top-K TV or KL, or the ratio)
    M_t   = trust-region mask(D_t, direction, Â_t)  Eq. 12 (DPPO) or PPO's ratio mask, detached
    S_b   = TRM sequence mask (optional)            arXiv 2512.23075
    ℓ_t   = −Â_t · sg(min(r_t, C)) · M_t · S_b · log π_θ(a_t)      Eq. 23 ("is" form)
    loss  = aggregate(ℓ, response_mask)

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
    ratio_mean         mean r_t = π/μ;  ratio_max: max r_t
    capped_frac        fraction of tokens with r_t > C (their weight truncated to C)
    seq_masked_frac    fraction of sequences (with ≥ 1 response token) dropped by the TRM sequence mask
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dppo import divergence as div
from dppo._checks import check_float, check_logp, check_same_shape, check_tensor, check_topk
from dppo.methods import Method, get_method
from dppo.trust_region import dppo_mask, ratio_mask, sequence_mask

__all__ = ["policy_loss", "aggregate", "aggregation_denominator", "TopK", "METRIC_KEYS"]

# exp(20) ≈ 4.9e8: keeps r finite in fp32 whatever the log-ratio (Stable-RL clamps the log-ratio at 20 as well).
MAX_LOG_RATIO = 20.0

METRIC_KEYS = (
    "loss", "tokens", "abs_diff_mean", "abs_diff_max", "abs_diff_min", "abs_dlogp_mean", "diff_max", "diff_min",
    "div_mean", "div_max", "masked_frac", "masked_frac_pos", "masked_frac_neg", "ratio_mean", "ratio_max",
    "capped_frac", "seq_masked_frac",
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


def aggregate(
    token_loss: Tensor, response_mask: Tensor, mode: str, max_len_norm: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Reduce [B, T] token losses to a scalar (verl's ``agg_loss`` modes), numerator / denominator:

    * ``"token-mean"``:  Σ_{b,t} ℓ·m / Σ_{b,t} m  (DAPO; every token of the batch weighs the same)
    * ``"seq-mean-token-mean"``: Σ_b (Σ_t ℓ·m / Σ_t m) / #{b : Σ_t m > 0}  (original GRPO)
    * ``"seq-mean-token-sum-norm"``: Σ_{b,t} ℓ·m / (B · L), L = ``max_len_norm`` or T  (Dr.GRPO; the paper's
      authors' setup, paper-notes §2)
    * ``"sum"``: Σ_{b,t} ℓ·m

    ``denominator``: None = this batch's own (:func:`aggregation_denominator`); a micro-batch of a larger batch
    passes the whole batch's, so that the micro-batch losses add up to the batch loss. An all-masked batch gives 0
    with a finite (zero) gradient.
    """
    m = response_mask.to(token_loss.dtype)
    masked = token_loss * m
    if mode == "seq-mean-token-mean":
        numerator = (masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)).sum()  # empty rows add 0
    elif mode in ("token-mean", "seq-mean-token-sum-norm", "sum"):
        numerator = masked.sum()
    else:
        raise ValueError(f"unknown aggregation {mode!r}")
    if denominator is None:
        denominator = aggregation_denominator(response_mask, mode, max_len_norm)
    return numerator / denominator


def _estimate(
    estimator: str,
    logp: Tensor,
    anchor_logp: Tensor,
    topk: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """D_t for one estimator, fp32, no grad. Top-K uses the rollout's top-K (its μ log-probs) whatever the anchor."""
    if estimator == "binary_tv" or estimator == "none":
        return div.binary_tv(logp, anchor_logp)
    if estimator == "binary_kl":
        return div.binary_kl(logp, anchor_logp)
    if estimator == "ratio":
        return torch.expm1((logp - anchor_logp).clamp(max=MAX_LOG_RATIO)).abs()
    assert topk is not None
    topk_logp, anchor_topk_logp, in_topk = topk
    fn = div.topk_tv if estimator == "topk_tv" else div.topk_kl
    return fn(logp, anchor_logp, topk_logp, anchor_topk_logp, in_topk)


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
) -> None:
    check_logp("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T] (batch, response tokens), got shape {tuple(logp.shape)}")
    if logp.numel() == 0:
        raise ValueError(f"empty batch: logp has shape {tuple(logp.shape)}; need B >= 1 and T >= 1")
    check_logp("rollout_logp", rollout_logp)
    check_tensor("response_mask", response_mask)
    if response_mask.dtype != torch.bool and not response_mask.is_floating_point() and response_mask.dtype not in (
        torch.int64, torch.int32, torch.uint8, torch.int8, torch.int16
    ):
        raise TypeError(f"response_mask must be bool or 0/1 numbers, got {response_mask.dtype}")
    check_same_shape("logp", logp, rollout_logp=rollout_logp, response_mask=response_mask)
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
                f"method {m.name!r} anchors to the recomputed policy (anchor='recompute') and needs old_logp: pass the "
                "log-probs of the policy before this update, or use a method with anchor='rollout'"
            )
    if old_logp is not None:
        check_logp("old_logp", old_logp)
        check_same_shape("logp", logp, old_logp=old_logp)
    if m.needs_topk:
        if topk_logp is None or rollout_topk_logp is None or sampled_in_topk is None:
            raise ValueError(
                f"method {m.name!r} uses a top-K estimator and needs topk_logp, rollout_topk_logp and sampled_in_topk "
                "(record the rollout's top-K ids and log-probs, method.topk of them), or use a binary estimator"
            )
    if topk_logp is not None or rollout_topk_logp is not None or sampled_in_topk is not None:
        if topk_logp is None or rollout_topk_logp is None or sampled_in_topk is None:
            raise ValueError("pass all three of topk_logp, rollout_topk_logp and sampled_in_topk, or none of them")
        check_topk("logp", logp, topk_logp, rollout_topk_logp, sampled_in_topk)


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
) -> tuple[Tensor, dict[str, float]]:
    """Policy loss of ``method`` on one batch (Eq. 23; module docstring for the steps and the metric glossary).

    Args:
        method: a :class:`dppo.Method` or a preset name from :data:`dppo.PRESETS`.
        logp: [B, T] log π_θ(a_t|s_t), differentiable; any float dtype (the loss is computed in fp32).
        rollout_logp: [B, T] log μ(a_t|s_t) recorded by the inference engine at sampling time.
        advantages: [B] (per sequence, broadcast over tokens) or [B, T].
        response_mask: [B, T] bool or 0/1; 0 marks prompt/padding tokens.
        old_logp: [B, T] log π_θ′(a_t|s_t), the trainer's recomputed log-probs before the update; needed by
            ``anchor="recompute"`` methods (MiniRL, DPPO-*-recompute).
        topk: a :class:`TopK` record (log π_θ and log μ at the rollout's top-K ids, and whether a_t is among them);
            needed by top-K estimators. Only used for the mask (no gradient flows through it).
        topk_logp, rollout_topk_logp, sampled_in_topk: the same three tensors as keywords (``topk`` or these).
        denominator: for gradient accumulation, the aggregation denominator of the whole mini-batch this call sees
            a micro-batch of (:func:`aggregation_denominator` on its response mask); the micro-batch losses then sum
            to the mini-batch loss exactly. None = this batch's own. Metrics stay per call.
    Returns:
        (loss, metrics): a 0-dim float32 tensor (float64 for float64 ``logp``) to call ``.backward()`` on, and a dict of floats (glossary above).
    """
    m = get_method(method)
    if topk is not None:
        if topk_logp is not None or rollout_topk_logp is not None or sampled_in_topk is not None:
            raise ValueError("pass the top-K inputs either as topk=TopK(...) or as the three keywords, not both")
        topk_logp, rollout_topk_logp, sampled_in_topk = topk
    _validate(m, logp, rollout_logp, advantages, response_mask, old_logp, topk_logp, rollout_topk_logp, sampled_in_topk)
    if denominator is not None:
        den = float(denominator)
        if not (math.isfinite(den) and den > 0):
            raise ValueError(f"denominator must be a finite number > 0 (the mini-batch's aggregation_denominator), "
                             f"got {den}")

    resp = response_mask.bool()
    # fp32 at least (bf16/fp16 inputs are upcast); float64 inputs stay float64 so gradcheck can verify the paths.
    dt = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(dt)
    lp_d = lp.detach()
    lmu = rollout_logp.detach().to(dt)
    anchor = old_logp.detach().to(dt) if m.anchor == "recompute" else lmu  # type: ignore[union-attr]
    adv = advantages.detach().to(dt)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(lp)
    topk = None
    if topk_logp is not None:
        topk = (topk_logp.detach().float(), rollout_topk_logp.detach().float(), sampled_in_topk)  # type: ignore[union-attr]

    with torch.no_grad():
        # IS weight against the rollout policy, truncated at C (Eq. 23). Clamped log-ratio keeps r finite.
        log_ratio = (lp_d - lmu).clamp(max=MAX_LOG_RATIO)
        ratio = torch.exp(log_ratio)
        weight = ratio.clamp(max=m.ratio_cap)

        # Token trust-region mask (Eq. 12 / PPO), against the method's anchor.
        estimate = _estimate(m.estimator, lp_d, anchor, topk)
        if m.estimator == "none":
            token_mask = torch.ones_like(lp_d, dtype=torch.float32)
        elif m.estimator == "ratio":
            token_mask = ratio_mask(
                lp_d, anchor, adv, m.delta_low, m.delta_high,
                relax_low_below=m.relax_low_below, relax_high_below=m.relax_high_below,
            )
        else:
            token_mask = dppo_mask(estimate, lp_d, anchor, adv, m.delta_low, m.delta_high)

        # TRM: whole-sequence mask on the max token divergence.
        if m.seq_delta != math.inf:
            seq_est = estimate if m.seq_estimator == m.estimator else _estimate(m.seq_estimator, lp_d, anchor, topk)
            seq_keep = sequence_mask(seq_est, resp, m.seq_delta)
        else:
            seq_keep = torch.ones(lp.shape[0], device=lp.device)
        seq_keep = seq_keep.to(dt)
        keep = token_mask.to(dt) * seq_keep[:, None]

    if m.loss_form == "is":
        # value −Â·M·min(r,C); gradient −Â·M·min(r,C)·∇log π, since exp(lp − sg(lp)) = 1 with gradient ∇lp.
        token_loss = -adv * keep * weight * torch.exp(lp - lp_d)
    elif m.loss_form == "ppo_clip":
        # PPO: −min(r′Â, clip(r′, 1−ε_l, 1+ε_h)Â), r′ = π/anchor, scaled by sg(min(r, C)/r′) so the gradient where
        # unclipped is −min(r, C)·Â·∇log π: the same as the "is" form (tested).
        r_anchor = torch.exp((lp - anchor).clamp(max=MAX_LOG_RATIO))
        clipped = r_anchor.clamp(1.0 - min(m.delta_low, 1.0), 1.0 + m.delta_high)
        surrogate = torch.minimum(r_anchor * adv, clipped * adv)
        token_loss = -(weight / r_anchor.detach()) * surrogate * seq_keep[:, None]
    else:  # drpo
        # −Â·r + |Â|·anchor·(r−1)²/(2δ); ∂/∂log π = −Â·r·(1 − sign(Â)(π − anchor)/δ) (paper-notes §8).
        r_anchor = torch.exp((lp - anchor).clamp(max=MAX_LOG_RATIO))
        penalty = adv.abs() * torch.exp(anchor) * (r_anchor - 1.0) ** 2 / (2.0 * m.drpo_delta)
        token_loss = (-adv * r_anchor + penalty) * keep

    loss = aggregate(token_loss, resp, m.aggregation, m.max_len_norm, denominator)
    metrics = _metrics(loss, lp_d, lmu, anchor, adv, resp, estimate, token_mask, seq_keep, ratio, m.ratio_cap)
    return loss, metrics


def _metrics(
    loss: Tensor, lp: Tensor, lmu: Tensor, anchor: Tensor, adv: Tensor, resp: Tensor, estimate: Tensor,
    token_mask: Tensor, seq_keep: Tensor, ratio: Tensor, cap: float,
) -> dict[str, float]:
    with torch.no_grad():
        n = resp.sum()
        denom = n.clamp(min=1).float()
        any_tok = n > 0

        def mean(x: Tensor) -> Tensor:
            return (x.float() * resp).sum() / denom

        def ext(x: Tensor, largest: bool) -> Tensor:
            fill = float("-inf") if largest else float("inf")
            v = x.masked_fill(~resp, fill)
            v = v.max() if largest else v.min()
            return torch.where(any_tok, v, torch.zeros_like(v))

        diff = torch.exp(lp) - torch.exp(lmu)
        absdiff = div.binary_tv(lp, lmu)
        masked = (token_mask == 0) & resp
        up = lp > anchor
        has_seq = resp.any(dim=-1)
        vals = torch.stack([
            loss.detach().float(),
            n.float(),
            mean(absdiff), ext(absdiff, True), ext(absdiff, False), mean((lp - lmu).abs()),
            ext(diff, True), ext(diff, False),
            mean(estimate), ext(estimate, True),
            mean(masked), mean(masked & (adv > 0) & up), mean(masked & (adv < 0) & ~up),
            mean(ratio), ext(ratio, True),
            mean(ratio > cap),
            ((seq_keep == 0) & has_seq).float().sum() / has_seq.float().sum().clamp(min=1.0),
        ])
        return dict(zip(METRIC_KEYS, vals.tolist()))
