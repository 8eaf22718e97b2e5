"""The per-token policy loss ℓ_t: a pure, elementwise function of log π_θ(a_t) with everything else detached,
composed from the method's parts (:mod:`dppo.parts`).

For every method, token t's loss depends on the policy only through x_t = log π_θ(a_t):

    r_t   = π_θ(a_t) / μ(a_t),  w_t = min(r_t, C)               IS weight against the rollout μ (always μ, Eq. 23)
    M_t, D_t = mask.apply(x_t, context)                          the token trust region and the estimate it thresholds
    G_t   = S_t · Π token gates                                  S_t: the sequence gates, computed before (sequence_gate)
    ℓ_t   = form.loss(x_t; Â_t, M_t, G_t, w_t) + penalty_t         e.g. IS (Eq. 23): −Â_t·sg(w_t)·M_t·G_t·x_t in value
                                                                 −Â·w·M·G

Because ℓ_t depends on token t alone, ∂L/∂x_t = ω_t · ∂ℓ_t/∂x_t for L = Σ_t ω_t ℓ_t (the aggregation weights of
:func:`dppo.aggregation.aggregation_weights`), which is what lets :mod:`dppo.fused` compute the loss gradient tile
by tile. Everything here works on any shape (e.g. [B, T] or flattened [N]) as long as the context tensors match
``logp``; the sequence gates need [B, T].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dppo.methods import Method
from dppo.parts import MAX_LOG_RATIO, estimate

__all__ = ["TokenContext", "TokenTerms", "token_loss", "token_context", "sequence_gate", "estimate", "MAX_LOG_RATIO"]


class TokenContext(NamedTuple):
    """Everything token t's loss needs besides log π_θ(a_t); detached, in the loss dtype, shaped like ``logp``
    (``logp_at_rollout_topk``/``rollout_topk_logp`` [..., K])."""

    rollout_logp: Tensor  # log μ(a_t)
    anchor_logp: Tensor  # log anchor(a_t): μ (anchor="rollout") or π_θ′ (anchor="recompute")
    advantages: Tensor  # Â_t, broadcast per token
    seq_keep: Tensor  # S_t: the sequence gates' weight (all ones without one)
    logp_at_rollout_topk: Tensor | None = None  # log π_θ at the rollout's top-K ids (mask only)
    rollout_topk_logp: Tensor | None = None  # log μ at the same ids
    sampled_in: Tensor | None = None  # bool: a_t among those ids

    @property
    def topk_logp(self) -> Tensor | None:
        """Deprecated name of ``logp_at_rollout_topk`` (log π_θ at the *rollout's* top-K ids, not π's own top-K)."""
        return self.logp_at_rollout_topk


class TokenTerms(NamedTuple):
    """Per-token outputs of :func:`token_loss`, all shaped like ``logp``."""

    loss: Tensor  # ℓ_t, differentiable in logp
    mask: Tensor  # M_t (detached): the token trust-region mask (for PPOClip: its zero-gradient region)
    estimate: Tensor  # D_t (detached): what the mask thresholds; Binary-TV as a diagnostic without a mask
    ratio: Tensor  # r_t = π/μ (detached, log-ratio clamped at MAX_LOG_RATIO)


def token_context(
    m: Method, rollout_logp: Tensor, advantages: Tensor, old_logp: Tensor | None, rollout_topk_logp: Tensor | None,
    sampled_in_topk: Tensor | None, dt: torch.dtype,
) -> TokenContext:
    """The detached per-token context of :func:`token_loss` for a [B, T] batch (no sequence gate yet, no log π_θ at
    the top-K ids: the caller adds them)."""
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


def sequence_gate(
    m: Method, logp: Tensor | None, ctx: TokenContext, old_logp: Tensor | None, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """S [B, T] = the product of the method's sequence gates (dtype of ``ctx.advantages``; ones without one), and
    which sequences' statistic crossed a gate's threshold [B] (bool). ``logp`` (read detached) is needed only by
    gates on the current policy (``m.single_pass`` False), ``old_logp`` by those on π_θ′."""
    adv = ctx.advantages
    keep = torch.ones_like(adv)
    over = torch.zeros(adv.shape[0], dtype=torch.bool, device=adv.device)
    if m.sequence_gates:
        with torch.no_grad():
            lp = logp.detach() if logp is not None else None
            for g in m.sequence_gates:
                k, o = g.keep(lp, ctx, old_logp, response_mask)
                keep, over = keep * k, over | o
    return keep, over


def token_loss(m: Method, logp: Tensor, ctx: TokenContext) -> TokenTerms:
    """ℓ_t of method ``m`` for every token (module docstring), elementwise.

    Args:
        m: the method (its parts).
        logp: [...] log π_θ(a_t), differentiable, float (the work is in ``promote(dtype, fp32)``).
        ctx: :class:`TokenContext` with tensors shaped like ``logp`` (the sequence gates already in ``seq_keep``).
    Returns:
        :class:`TokenTerms`; ``loss`` has ∂loss_t/∂logp_t as its only dependence on ``logp``.
    """
    dt = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(dt)
    lp_d = lp.detach()
    with torch.no_grad():
        # IS weight against the rollout policy, truncated at C (Eq. 23). Clamped log-ratio keeps r finite.
        ratio = torch.exp((lp_d - ctx.rollout_logp).clamp(max=MAX_LOG_RATIO))
        weight = ratio.clamp(max=m.cap)
        mask, est = m.mask.apply(lp_d, ctx)
        gate = ctx.seq_keep
        for g in m.token_gates:
            gate = gate * g.weight(ctx)
    loss = m.form.loss(m, lp, lp_d, ctx, mask, gate, weight)
    if m.penalty is not None:
        loss = loss + m.penalty.loss(lp, ctx)
    return TokenTerms(loss=loss, mask=mask, estimate=est, ratio=ratio)
