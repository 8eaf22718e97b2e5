"""Trust-region masks M_t ∈ {0, 1}: which tokens keep their gradient. Always float32 and detached.

A DPPO mask only ever blocks an update that moves a token *away* from the anchor in the direction its advantage
pushes (Eq. 12, ``sides="away"``): the positive side (Â > 0 and π above the anchor) and the negative side (Â < 0 and
π below it). An update that moves π back towards the anchor is never blocked. Tokens with Â = 0 carry no gradient
either way. ``sides="any"`` drops the advantage condition (IPO, prime-rl PR #1930/#2798: a token is masked when its
estimate exceeds the threshold of its side, whatever Â).

Thresholds are inclusive of the boundary (a token exactly at δ is kept): the paper writes "D_t > δ" in Eq. 12 and the
authors' code uses ">" throughout (Stable-RL core_algos.py; the §5.3 minimal mask is written "≥" in the text, a measure-zero
difference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dppo._checks import check_float, check_same_shape

__all__ = ["dppo_mask", "ratio_mask", "sequence_mask"]


def _check_threshold(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (float('inf') disables that side), got {value!r}")


def _direction(advantages: Tensor, sides: str) -> tuple[Tensor | bool, Tensor | bool]:
    """(positive-side, negative-side) advantage conditions: Â > 0 / Â < 0 for "away", none for "any"."""
    if sides == "away":
        return advantages > 0, advantages < 0
    if sides == "any":
        return True, True
    raise ValueError(f"sides must be 'away' (Eq. 12) or 'any' (IPO), got {sides!r}")


def dppo_mask(
    divergence: Tensor,
    logp: Tensor,
    anchor_logp: Tensor,
    advantages: Tensor,
    delta_low: float,
    delta_high: float,
    sides: str = "away",
) -> Tensor:
    """DPPO's direction-aware divergence mask (Eq. 12), separate thresholds per side.

        M_t = 0  if  (Â_t > 0 and π > anchor and D_t > δ_high)  or  (Â_t < 0 and π < anchor and D_t > δ_low)
        M_t = 1  otherwise.

    ``sides="any"`` drops the "Â_t > 0" / "Â_t < 0" conditions (IPO).

    Args:
        divergence: [...] D_t, an estimate of D(anchor(·|s_t) ‖ π(·|s_t)) (see :mod:`dppo.divergence`).
        logp: [...] log π(a_t|s_t); anchor_logp: [...] log of the anchor's prob of a_t (μ, or π_θ′ for "recompute").
        advantages: [...] Â_t, same shape (broadcast a per-sequence advantage before calling).
        delta_low: δ of the negative side (Â < 0); delta_high: δ of the positive side (Â > 0).
        sides: "away" (Eq. 12) or "any".
    Returns:
        [...] float32 mask, detached.
    """
    for name, x in (("divergence", divergence), ("logp", logp), ("anchor_logp", anchor_logp), ("advantages", advantages)):
        check_float(name, x)
    check_same_shape("divergence", divergence, logp=logp, anchor_logp=anchor_logp, advantages=advantages)
    _check_threshold("delta_low", delta_low)
    _check_threshold("delta_high", delta_high)
    with torch.no_grad():
        d = divergence.detach().float()
        lp, la, adv = logp.detach().float(), anchor_logp.detach().float(), advantages.detach().float()
        pos, neg = _direction(adv, sides)
        blocked = (pos & (lp > la) & (d > delta_high)) | (neg & (lp < la) & (d > delta_low))
        return (~blocked).float()


def ratio_mask(
    logp: Tensor,
    anchor_logp: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    *,
    relax_low_below: float = 0.0,
    relax_high_below: float = 0.0,
    sides: str = "away",
) -> Tensor:
    """PPO's ratio mask on r = π/anchor (the zero-gradient region of PPO-clip), with clip-higher and the §6 ablations.

        M_t = 0  if  (Â_t > 0 and r_t > 1 + ε_high and anchor(a_t) ≥ α_high)
                  or (Â_t < 0 and r_t < 1 − ε_low  and anchor(a_t) ≥ α_low)

    ε_low = ε_high = 0.2 is PPO/GRPO; ε_high = 0.28 is DAPO's clip-higher (§5.1). α > 0 exempts tokens the anchor
    gives probability below α from that side, i.e. ε = ∞ for them: "Relax-low/high/both" of §6, Fig. 7 (α = 0.1).
    The comparison is made in log space (log r > log(1 + ε)), so no ratio overflows. ``sides="any"`` drops the
    advantage conditions (a symmetric ratio trust region).

    Args:
        logp: [...] log π(a_t); anchor_logp: [...] log anchor(a_t) (μ for GRPO, π_θ′ for MiniRL); advantages: [...].
        eps_low, eps_high: ≥ 0; inf disables a side, and ε_low ≥ 1 can never trigger (r > 0).
        relax_low_below, relax_high_below: α in [0, 1] per side; 0 = no relaxation.
    Returns:
        [...] float32 mask, detached.
    """
    for name, x in (("logp", logp), ("anchor_logp", anchor_logp), ("advantages", advantages)):
        check_float(name, x)
    check_same_shape("logp", logp, anchor_logp=anchor_logp, advantages=advantages)
    _check_threshold("eps_low", eps_low)
    _check_threshold("eps_high", eps_high)
    for name, a in (("relax_low_below", relax_low_below), ("relax_high_below", relax_high_below)):
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {a!r}")
    with torch.no_grad():
        lp, la, adv = logp.detach().float(), anchor_logp.detach().float(), advantages.detach().float()
        log_ratio = lp - la
        hi = math.log1p(eps_high) if math.isfinite(eps_high) else math.inf
        lo = math.log1p(-eps_low) if eps_low < 1.0 else -math.inf
        anchor_prob = torch.exp(la)
        pos, neg = _direction(adv, sides)
        blocked_pos = pos & (log_ratio > hi) & (anchor_prob >= relax_high_below)
        blocked_neg = neg & (log_ratio < lo) & (anchor_prob >= relax_low_below)
        return (~(blocked_pos | blocked_neg)).float()


def sequence_mask(divergence: Tensor, response_mask: Tensor, delta: float, reduce: str = "max") -> Tensor:
    """A whole-sequence gate: keep a sequence only if its token divergences, reduced over the response, are ≤ δ.

        M(x, y) = 1[ reduce_{t ∈ response} D_t ≤ δ ]

    ``reduce="max"``: Trust Region Masking (TRM, arXiv 2512.23075), whose bounds depend on the max
    token divergence of the sequence. ``reduce="mean"``: the mean over the response tokens (VACO, arXiv 2603.01365,
    as open-instruct PR #1755 computes it: Σ_t D_t·m_t / max(Σ_t m_t, 1)). Not direction-aware.

    Args:
        divergence: [B, T] per-token estimate D_t; response_mask: [B, T] bool or 0/1 (padding is ignored).
        delta: δ ≥ 0 (inf keeps every sequence).
        reduce: "max" or "mean".
    Returns:
        [B] float32, detached. A sequence with no response token is kept (it carries no loss anyway).
    """
    check_float("divergence", divergence)
    if divergence.dim() != 2:
        raise ValueError(f"divergence must be [B, T], got shape {tuple(divergence.shape)}")
    check_same_shape("divergence", divergence, response_mask=response_mask)
    _check_threshold("delta", delta)
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' (TRM) or 'mean' (VACO), got {reduce!r}")
    with torch.no_grad():
        resp = response_mask.bool()
        d = divergence.detach().float()
        if reduce == "max":
            stat = d.masked_fill(~resp, float("-inf")).max(dim=-1).values
        else:
            m = resp.float()
            stat = (d.masked_fill(~resp, 0.0) * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
        return (stat <= delta).float()
