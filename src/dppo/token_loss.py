"""The per-token policy loss ℓ_t: a pure, elementwise function of log π_θ(a_t) with everything else detached.

For every method and loss form, token t's loss depends on the policy only through x_t = log π_θ(a_t):

    r_t   = π_θ(a_t) / μ(a_t)                                   IS ratio against the rollout μ (always μ, Eq. 23)
    D_t   = estimate of D(anchor(·|s_t) ‖ π(·|s_t))               the method's estimator (binary / top-K TV or KL, ratio)
    M_t   = token mask(D_t, direction, Â_t)                        Eq. 12 (DPPO), PPO's ratio mask, or IPO's symmetric mask
    b_t   = π_θ′(a_t) / μ(a_t),  B_t = band(b_t)·min(b_t, cap)/b_t behaviour weight (IcePop band, VACO cap); 1 if unused
    S_t   = sequence gate (precomputed, per token)               TRM / VACO
    ℓ_t   = −Â_t · sg(min(r_t, C)) · M_t · S_t · B_t · x_t                               "is" (Eq. 23), value −Â·min(r,C)·M·S·B
          = −sg(min(r_t, C)/ρ_t) · S_t · B_t · min(ρ_t Â_t, clip(ρ_t, 1−ε_l, 1+ε_h) Â_t)  "ppo_clip", ρ_t = π/anchor
          = (−Â_t ρ_t + |Â_t|·anchor(a_t)·(ρ_t − 1)²/(2δ)) · M_t · S_t                  "drpo" (DRPO, arXiv 2606.09821)
          (+ κ · (x_t − log μ(a_t))²  on every response token when kl_coef κ > 0: IPO's penalty)

Because ℓ_t depends on token t alone, ∂L/∂x_t = w_t · ∂ℓ_t/∂x_t for L = Σ_t w_t ℓ_t (the aggregation weights of
:func:`dppo.loss.aggregation_weights`), which is what lets :mod:`dppo.fused` compute the loss gradient tile by tile.
Everything here works on any shape (e.g. [B, T] or flattened [N]) as long as the context tensors match ``logp``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dppo import divergence as div
from dppo.methods import Method
from dppo.trust_region import dppo_mask, ratio_mask, sequence_mask

__all__ = ["TokenContext", "TokenTerms", "token_loss", "estimate", "sequence_gate", "MAX_LOG_RATIO"]

# exp(20) ≈ 4.9e8: keeps r finite in fp32 whatever the log-ratio (Stable-RL clamps the log-ratio at 20 as well).
MAX_LOG_RATIO = 20.0


class TokenContext(NamedTuple):
    """Everything token t's loss needs besides log π_θ(a_t); detached, in the loss dtype, shaped like ``logp``
    (``topk_logp``/``rollout_topk_logp`` [..., K])."""

    rollout_logp: Tensor  # log μ(a_t)
    anchor_logp: Tensor  # log anchor(a_t): μ (anchor="rollout") or π_θ′ (anchor="recompute")
    advantages: Tensor  # Â_t, broadcast per token
    seq_keep: Tensor  # S_t ∈ {0, 1}: the sequence gate (all ones without one)
    topk_logp: Tensor | None = None  # log π_θ at the rollout's top-K ids (mask only)
    rollout_topk_logp: Tensor | None = None  # log μ at the same ids
    sampled_in: Tensor | None = None  # bool: a_t among those ids


class TokenTerms(NamedTuple):
    """Per-token outputs of :func:`token_loss`, all shaped like ``logp``."""

    loss: Tensor  # ℓ_t, differentiable in logp
    mask: Tensor  # M_t (float, detached): the token trust-region mask (for "ppo_clip": its zero-gradient region)
    estimate: Tensor  # D_t (detached): what the mask thresholds; Binary-TV as a diagnostic for estimator "none"
    ratio: Tensor  # r_t = π/μ (detached, log-ratio clamped at MAX_LOG_RATIO)


def estimate(estimator: str, logp: Tensor, anchor_logp: Tensor, topk: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """D_t for one estimator, fp32, no grad. Top-K uses the rollout's top-K (its μ log-probs) whatever the anchor."""
    if estimator == "binary_tv" or estimator == "none":
        return div.binary_tv(logp, anchor_logp)
    if estimator == "binary_kl":
        return div.binary_kl(logp, anchor_logp)
    if estimator == "ratio":
        return torch.expm1((logp - anchor_logp).clamp(max=MAX_LOG_RATIO)).abs()
    if topk is None:
        raise ValueError(f"estimator {estimator!r} needs the top-K log-probs (topk_logp, rollout_topk_logp, "
                         "sampled_in_topk)")
    fn = div.topk_tv if estimator == "topk_tv" else div.topk_kl
    return fn(logp, anchor_logp, *topk)


def _topk(ctx: TokenContext) -> tuple[Tensor, Tensor, Tensor] | None:
    if ctx.topk_logp is None:
        return None
    return ctx.topk_logp, ctx.rollout_topk_logp, ctx.sampled_in  # type: ignore[return-value]


def sequence_gate(
    m: Method, logp: Tensor | None, ctx: TokenContext, old_logp: Tensor | None, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """The sequence gate S [B, T] (1 = kept; dtype of ``ctx.advantages``) and which sequences' statistic exceeds
    ``seq_delta`` [B] (bool).

    The statistic is ``seq_reduce`` over the response of ``seq_estimator`` between (p, q) = (π_θ, anchor) for
    ``seq_policy="current"`` (TRM) or (π_θ′, μ) for ``"old"`` (VACO). A sequence over δ loses all its tokens
    (``seq_sides="all"``) or those with sign(log p − log q)·Â > 0 (``"away"``). ``logp`` (detached) is only read
    for ``"current"``, ``old_logp`` only for ``"old"``.
    """
    adv = ctx.advantages
    if not m.has_seq_gate:
        return torch.ones_like(adv), torch.zeros(adv.shape[0], dtype=torch.bool, device=adv.device)
    with torch.no_grad():
        if m.seq_policy == "current":
            assert logp is not None
            p, q, topk = logp.detach(), ctx.anchor_logp, _topk(ctx)
        else:
            assert old_logp is not None
            p, q, topk = old_logp.detach().to(adv.dtype), ctx.rollout_logp, None
        d = estimate(m.seq_estimator, p, q, topk)
        over = sequence_mask(d, response_mask, m.seq_delta, reduce=m.seq_reduce) == 0
        drop = over[:, None].expand_as(adv)
        if m.seq_sides == "away":
            drop = drop & (torch.sign(p - q) * adv > 0)
        return (~drop).to(adv.dtype), over


def token_loss(m: Method, logp: Tensor, ctx: TokenContext) -> TokenTerms:
    """ℓ_t of method ``m`` for every token (module docstring for the forms), elementwise.

    Args:
        m: the method (its estimator, anchor, thresholds, cap, sides, behaviour band/cap, loss form, kl_coef).
        logp: [...] log π_θ(a_t), differentiable, float (the work is in ``promote(dtype, fp32)``).
        ctx: :class:`TokenContext` with tensors shaped like ``logp`` (the sequence gate already applied per token).
    Returns:
        :class:`TokenTerms`; ``loss`` has ∂loss_t/∂logp_t as its only dependence on ``logp``.
    """
    dt = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(dt)
    lp_d = lp.detach()
    lmu, anchor, adv, seq_keep = ctx.rollout_logp, ctx.anchor_logp, ctx.advantages, ctx.seq_keep
    with torch.no_grad():
        # IS weight against the rollout policy, truncated at C (Eq. 23). Clamped log-ratio keeps r finite.
        ratio = torch.exp((lp_d - lmu).clamp(max=MAX_LOG_RATIO))
        weight = ratio.clamp(max=m.ratio_cap)
        est = estimate(m.estimator, lp_d, anchor, _topk(ctx))
        if m.estimator == "none":
            mask = torch.ones_like(lp_d)
        elif m.estimator == "ratio":
            mask = ratio_mask(lp_d, anchor, adv, m.delta_low, m.delta_high, relax_low_below=m.relax_low_below,
                              relax_high_below=m.relax_high_below, sides=m.mask_sides).to(dt)
        else:
            mask = dppo_mask(est, lp_d, anchor, adv, m.delta_low, m.delta_high, sides=m.mask_sides).to(dt)
        gate = seq_keep
        if m.behavior_low > 0 or m.behavior_high != math.inf or m.behavior_cap != math.inf:
            b = torch.exp((anchor - lmu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
            band = (b >= m.behavior_low) & (b <= m.behavior_high)
            gate = gate * torch.where(band, b.clamp(max=m.behavior_cap) / b, torch.zeros_like(b))

    if m.loss_form == "is":
        # value −Â·M·min(r,C); gradient −Â·M·min(r,C)·∇log π, since exp(lp − sg(lp)) = 1 with gradient ∇lp.
        loss = -adv * (mask * gate) * weight * torch.exp(lp - lp_d)
    elif m.loss_form == "ppo_clip":
        # PPO: −min(ρÂ, clip(ρ, 1−ε_l, 1+ε_h)Â), ρ = π/anchor, scaled by sg(min(r, C)/ρ) so the gradient where
        # unclipped is −min(r, C)·Â·∇log π: the same as the "is" form (tested). With anchor="recompute" and C = ∞,
        # min(r, C)/ρ = π_θ′/μ = b, the decoupled-PPO correction IcePop and VACO band or cap through ``gate``.
        rho = torch.exp((lp - anchor).clamp(max=MAX_LOG_RATIO))
        clipped = rho.clamp(1.0 - min(m.delta_low, 1.0), 1.0 + m.delta_high)
        surrogate = torch.minimum(rho * adv, clipped * adv)
        loss = -(weight / rho.detach()) * surrogate * gate
    else:  # drpo
        # −Â·ρ + |Â|·anchor·(ρ−1)²/(2δ); ∂/∂log π = −Â·ρ·(1 − sign(Â)(π − anchor)/δ) (DRPO, arXiv 2606.09821).
        rho = torch.exp((lp - anchor).clamp(max=MAX_LOG_RATIO))
        penalty = adv.abs() * torch.exp(anchor) * (rho - 1.0) ** 2 / (2.0 * m.drpo_delta)
        loss = (-adv * rho + penalty) * (mask * gate)
    if m.kl_coef > 0:
        # κ·(log π − log μ)² (prime-rl kl_loss = log_importance_ratio**2 on the whole loss mask), gradient 2κ·log r.
        log_r = (lp - lmu).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        loss = loss + m.kl_coef * log_r**2
    return TokenTerms(loss=loss, mask=mask, estimate=est, ratio=ratio)
