"""Estimates of the per-state divergence D(μ(·|s_t) ‖ π(·|s_t)) between the rollout policy μ and the policy π.

Paper: arXiv 2602.04879 §4.4 and App. B. Every estimate collapses the vocabulary into a coarser partition and
computes the divergence on it, so (triangle / log-sum inequality, App. B)

    binary ≤ top-K ≤ exact          for TV and for KL(μ‖π).

Conventions for every function here:
  * inputs are log-probabilities (``log π``, ``log μ``) of any floating dtype and any leading shape; the work and the
    result are float32 whatever the input dtype (a bf16 difference of two nearly equal probabilities rounds the shift
    away);
  * ``-inf`` is a legal log-prob (probability 0); NaN and ``+inf`` are rejected;
  * KL is D_KL(μ‖π) = Σ_a μ(a) log(μ(a)/π(a)), the paper's direction (Eq. 14, 16).

Zero-mass conventions (documented, tested):
  * a cell where μ has mass 0 contributes 0 to KL (0·log 0 = 0);
  * π = 0 on a listed token (log π = −inf) that μ gives mass gives KL = +inf, the true value (the token lies outside
    any trust region); TV = μ(a_t) exactly. Never NaN;
  * a *rest* mass (1 − π(a_t) for Binary-KL, the "other" cell of Top-K), which is obtained by subtraction, has its
    π side floored at ``MASS_FLOOR`` = 1e-12 in KL (Stable-RL's ``compute_topk_kl`` clamps the same way). Rounding can
    drive it to 0: fp32 ``log_softmax`` returns exactly 0 for a token of probability > 1 − 6e-8, and listed top-K
    masses can sum to 1 ± 1e-7. Unfloored, that would give KL = +inf and mask a token that hardly moved. Raising a
    π-mass only lowers that cell's term μ·log(μ/π), so the estimate stays a lower bound of the exact KL.
  * Top-K's "other" cell is 1 − (a sum of K + 1 masses), so with fp32 inputs each side's is known only to
    r = (K+1)·eps_fp32 (1.2e-7 per cell). Where π's true "other" mass π_o is below r it can round to 0 and be
    floored at 1e-12, and Top-K KL then over-estimates by up to μ_o·log(π_o/1e-12); μ_o's rounding adds at most
    r·(log 1e12 + 1) ≈ 3e-6·(K+1)/8. That case is a policy that moved essentially all its mass off tokens μ still
    gives μ_o to, whose exact KL is already ≥ μ_o·log(μ_o/r) − μ_o; over-estimating masks more, never less.
    fp64 inputs are summed in fp64 and have none of this. Both regimes are tested (``test_divergence.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dppo._checks import check_float, check_finite, check_logp, check_same_shape, check_topk

__all__ = [
    "MASS_FLOOR",
    "binary_tv",
    "binary_kl",
    "topk_tv",
    "topk_kl",
    "exact_tv",
    "exact_kl",
    "log1mexp",
]

MASS_FLOOR = 1e-12
_LOG_MASS_FLOOR = math.log(MASS_FLOOR)
# Rows of [*, V] fp32 temporaries held at once by exact_*: 2**24 floats = 64 MiB per temporary.
_EXACT_CHUNK_ELEMS = 1 << 24


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012): log(−expm1(x)) near 0, log1p(−exp(x)) below.

    Returns −inf at x = 0 (mass 1 → rest mass 0).
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _abs_prob_diff(logp: Tensor, logq: Tensor) -> Tensor:
    """|exp(logp) − exp(logq)| without cancellation: exp(max)·(1 − exp(−|logp − logq|)) = exp(max)·(−expm1(−|d|)).

    When both probabilities are near 1, p − q by subtraction loses every digit; this form keeps them.
    """
    hi = torch.maximum(logp, logq)
    lo = torch.minimum(logp, logq)
    gap = lo - hi  # ≤ 0; -inf - (-inf) = nan when both are -inf: handled below
    out = torch.exp(hi) * -torch.expm1(gap)
    return torch.where(torch.isneginf(hi), torch.zeros_like(out), out)


def _signed_prob_diff(logp: Tensor, logq: Tensor) -> Tensor:
    """exp(logp) − exp(logq), sign kept, cancellation-free (see :func:`_abs_prob_diff`)."""
    return torch.where(logp >= logq, 1.0, -1.0) * _abs_prob_diff(logp, logq)


def _kl_term(log_mu: Tensor, log_pi: Tensor, floor: bool = True) -> Tensor:
    """One cell's μ·(log μ − log π), with μ = 0 → 0 and (if ``floor``) π floored at MASS_FLOOR (module docstring)."""
    if floor:
        log_pi = log_pi.clamp(min=_LOG_MASS_FLOOR)
    term = torch.exp(log_mu) * (log_mu - log_pi)
    return torch.where(torch.isneginf(log_mu), torch.zeros_like(term), term)


def _binary_inputs(logp: Tensor, rollout_logp: Tensor) -> tuple[Tensor, Tensor]:
    check_logp("logp", logp)
    check_logp("rollout_logp", rollout_logp)
    check_same_shape("logp", logp, rollout_logp=rollout_logp)
    return logp.float().clamp(max=0.0), rollout_logp.float().clamp(max=0.0)


def binary_tv(logp: Tensor, rollout_logp: Tensor) -> Tensor:
    """Binary TV (Eq. 13): D_TV^Bin(t) = |μ(a_t|s_t) − π(a_t|s_t)|.

    TV of the Bernoulli (a_t, rest) pair is ½(|μ−π| + |(1−μ)−(1−π)|) = |μ−π|.

    Args:
        logp: [...] log π(a_t|s_t), any float dtype.
        rollout_logp: [...] log μ(a_t|s_t), same shape.
    Returns:
        [...] float32 in [0, 1].
    """
    lp, lmu = _binary_inputs(logp, rollout_logp)
    return _abs_prob_diff(lp, lmu)


def binary_kl(logp: Tensor, rollout_logp: Tensor) -> Tensor:
    """Binary KL (Eq. 14): μ log(μ/π) + (1−μ) log((1−μ)/(1−π)), evaluated at the sampled token a_t.

    The rest masses 1−p come from ``log1mexp(log p)`` so the value stays exact as p → 1 (where 1 − exp(log p)
    would cancel). π's rest mass is floored at MASS_FLOOR; π(a_t) = 0 < μ(a_t) gives +inf (module docstring).

    Args:
        logp: [...] log π(a_t|s_t); rollout_logp: [...] log μ(a_t|s_t), same shape.
    Returns:
        [...] float32, ≥ 0.
    """
    lp, lmu = _binary_inputs(logp, rollout_logp)
    log_rest_mu, log_rest_pi = log1mexp(lmu), log1mexp(lp)
    # (1−μ)·log((1−μ)/(1−π)) written as (1−μ)·log1p((π−μ)/(1−π)): for π ≈ μ the two logs would cancel to ~1e-9
    # absolute in fp32, while π − μ is known to full relative precision.
    rest_pi = torch.exp(log_rest_pi)
    precise = torch.exp(log_rest_mu) * torch.log1p(_signed_prob_diff(lp, lmu) / rest_pi)
    rest = torch.where(rest_pi > MASS_FLOOR, precise, _kl_term(log_rest_mu, log_rest_pi))
    rest = torch.where(torch.isneginf(log_rest_mu), torch.zeros_like(rest), rest)
    kl = _kl_term(lmu, lp, floor=False) + rest
    return kl.clamp(min=0.0)


def _topk_cells(
    logp: Tensor, rollout_logp: Tensor, logp_at_rollout_topk: Tensor, rollout_topk_logp: Tensor,
    sampled_in_topk: Tensor,
) -> tuple[Tensor, Tensor]:
    """Log-masses of the reduced space A″ = TopK_μ ∪ {a_t} ∪ {other} (§4.4), as [..., K+2] for μ and for π.

    Cell K holds a_t when it is *not* among the top-K ids (else log-mass −inf, so a_t is never counted twice);
    cell K+1 is "other" = 1 − (sum of the other cells), clamped at 0 when the listed mass sums slightly over 1
    (rounding of engine log-probs), never negative.
    """
    check_logp("logp", logp)
    check_logp("rollout_logp", rollout_logp)
    check_same_shape("logp", logp, rollout_logp=rollout_logp)
    check_topk("logp", logp, logp_at_rollout_topk, rollout_topk_logp, sampled_in_topk)
    neg_inf = torch.tensor(float("-inf"), device=logp.device)
    # "other" is 1 − a sum of K+1 masses: fp32 leaves up to ~(K+1)·1.2e-7 of rounding in it, which the KL floor turns
    # into up to ~1e-6·(K+1) of spurious KL. fp64 inputs keep fp64 here, so that noise is gone where the caller has
    # the precision (the property tests); the returned estimates are fp32 either way.
    work = torch.float64 if torch.float64 in (logp.dtype, rollout_logp.dtype, logp_at_rollout_topk.dtype,
                                               rollout_topk_logp.dtype) else torch.float32

    def cells(lp_sampled: Tensor, lp_topk: Tensor) -> Tensor:
        extra = torch.where(sampled_in_topk, neg_inf, lp_sampled.to(work).clamp(max=0.0))
        listed = torch.cat([lp_topk.to(work).clamp(max=0.0), extra.unsqueeze(-1)], dim=-1)
        log_listed_mass = torch.logsumexp(listed, dim=-1).clamp(max=0.0)
        return torch.cat([listed, log1mexp(log_listed_mass).unsqueeze(-1)], dim=-1)

    return cells(rollout_logp, rollout_topk_logp), cells(logp, logp_at_rollout_topk)


def topk_tv(
    logp: Tensor, rollout_logp: Tensor, logp_at_rollout_topk: Tensor, rollout_topk_logp: Tensor,
    sampled_in_topk: Tensor,
) -> Tensor:
    """Top-K TV (Eq. 15): ½ Σ_{a ∈ A″} |μ̃(a) − π̃(a)| over A″ = TopK(μ, K) ∪ {a_t} ∪ {other}.

    Args:
        logp: [...] log π(a_t|s_t); rollout_logp: [...] log μ(a_t|s_t).
        logp_at_rollout_topk: [..., K] log π at the rollout's top-K ids; rollout_topk_logp: [..., K] log μ at the
            same ids.
        sampled_in_topk: [...] bool, True where a_t is among those ids (it is then not counted a second time).
    Returns:
        [...] float32 in [0, 1]; binary_tv ≤ topk_tv ≤ exact_tv (App. B).
    """
    mu, pi = _topk_cells(logp, rollout_logp, logp_at_rollout_topk, rollout_topk_logp, sampled_in_topk)
    return (0.5 * _abs_prob_diff(pi, mu).sum(dim=-1)).float()


def topk_kl(
    logp: Tensor, rollout_logp: Tensor, logp_at_rollout_topk: Tensor, rollout_topk_logp: Tensor,
    sampled_in_topk: Tensor,
) -> Tensor:
    """Top-K KL (Eq. 16): Σ_{a ∈ A″} μ̃(a) log(μ̃(a)/π̃(a)), same cells and arguments as :func:`topk_tv`.

    Returns:
        [...] float32, ≥ 0; binary_kl ≤ topk_kl ≤ exact_kl (App. B, log-sum inequality).
    """
    mu, pi = _topk_cells(logp, rollout_logp, logp_at_rollout_topk, rollout_topk_logp, sampled_in_topk)
    listed = _kl_term(mu[..., :-1], pi[..., :-1], floor=False).sum(dim=-1)
    return (listed + _kl_term(mu[..., -1], pi[..., -1])).clamp(min=0.0).float()


def _exact(logits: Tensor, rollout_logits: Tensor, kind: str) -> Tensor:
    check_float("logits", logits)
    check_float("rollout_logits", rollout_logits)
    check_same_shape("logits", logits, rollout_logits=rollout_logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension last, got shape {tuple(logits.shape)}")
    check_finite("logits", logits, allow_neg_inf=True)
    check_finite("rollout_logits", rollout_logits, allow_neg_inf=True)
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    flat_pi = logits.reshape(-1, vocab)
    flat_mu = rollout_logits.reshape(-1, vocab)
    out = torch.empty(flat_pi.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, _EXACT_CHUNK_ELEMS // vocab)
    for start in range(0, flat_pi.shape[0], rows):
        lpi = torch.log_softmax(flat_pi[start : start + rows].float(), dim=-1)
        lmu = torch.log_softmax(flat_mu[start : start + rows].float(), dim=-1)
        if kind == "tv":
            out[start : start + rows] = 0.5 * _abs_prob_diff(lpi, lmu).sum(dim=-1)
        else:
            out[start : start + rows] = _kl_term(lmu, lpi, floor=False).sum(dim=-1).clamp(min=0.0)
    return out.reshape(lead)


def exact_tv(logits: Tensor, rollout_logits: Tensor) -> Tensor:
    """Exact TV over the full vocabulary: ½ Σ_v |softmax(rollout_logits)_v − softmax(logits)_v|.

    Ground truth and diagnostics (the paper calls it "memory-prohibitive", §4.4). Rows are processed in chunks so at
    most ~64 MiB per [chunk, V] fp32 temporary is alive (≈110 rows at V = 151,936), whatever the number of rows.

    Args:
        logits: [..., V] policy logits (temperature already applied); rollout_logits: [..., V] rollout logits.
    Returns:
        [...] float32.
    """
    return _exact(logits, rollout_logits, "tv")


def exact_kl(logits: Tensor, rollout_logits: Tensor) -> Tensor:
    """Exact KL(μ‖π) over the full vocabulary, μ = softmax(rollout_logits), π = softmax(logits); chunked as exact_tv.

    Returns:
        [...] float32, ≥ 0; no floor here (it is the ground truth): +inf where π = 0 < μ for some token.
    Note: π-mass below fp32's smallest normal (~1e-38) underflows in ``log_softmax`` only for logit gaps > 87.
    """
    return _exact(logits, rollout_logits, "kl")
