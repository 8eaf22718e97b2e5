"""The parts a policy-loss method is built from: each a frozen dataclass holding its numbers and one pure function.

Token t's loss is composed from them as (:func:`dppo.token_loss.token_loss`)

    r_t  = π_θ(a_t)/μ(a_t),   w_t = sg(min(r_t, C))          the IS weight against the rollout μ, capped (Eq. 23)
    M_t, D_t = mask(log π_θ, context)                        the token trust region and the estimate it thresholds
    G_t  = S_t · Π_gates g_t                                 detached weights: S_t from the sequence gates, g_t per token
    ℓ_t  = form(log π_θ; Â_t, M_t, G_t, w_t) + penalty_t      how they make the loss

    mask     NoMask | RatioMask (PPO, §4) | DivergenceMask (DPPO, Eq. 12; IPO, KPop)
    gates    BehaviorWeight (IcePop, VACO; per token) | SequenceMask (TRM, VACO) | OffPolicySequenceMask
             (DeepSeek-V3.2) | GammaWeight (VESPO)   — the last three per sequence
    form     IS (Eq. 23) | PPOClip (PPO's min form) | DRPO (smooth penalty) | PG (−Â·log π: VESPO, DRO)
    penalty  LogRatioPenalty: κ·(log π − log μ)² on every response token (IPO, KPop, DRO)

Every function here is pure and elementwise over tokens (a sequence gate reduces over its sequence only) and reads
only detached tensors besides ``lp`` (log π_θ(a_t), the one input gradients flow through). Tensors are shaped like
``lp`` ([B, T], or [N] for the fused path's flattened tiles) in its dtype (fp32, or fp64 for fp64 inputs); sequence
gates see [B, T]. What a part reads from the context (:class:`dppo.token_loss.TokenContext`): ``rollout_logp`` (log μ),
``anchor_logp`` (log μ or log π_θ′), ``advantages`` (Â, per token), and for top-K estimators ``logp_at_rollout_topk``,
``rollout_topk_logp``, ``sampled_in``.

A part checks its own numbers when built; which parts may go together (PPOClip needs a RatioMask, …) is checked by
:class:`dppo.methods.Method`. Each class's ``KIND`` names it in ``method.json`` and in overrides
(``"grpo@form=is"``, ``"vaco@gates.sequence.delta=0.3"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar, Literal, Union

import torch
from torch import Tensor

from dppo import divergence as div
from dppo.trust_region import dppo_mask, ratio_mask, sequence_mask

if TYPE_CHECKING:  # the context record lives with the function that composes the parts
    from dppo.methods import Method
    from dppo.token_loss import TokenContext

__all__ = ["NoMask", "RatioMask", "DivergenceMask", "IS", "PPOClip", "DRPO", "PG", "BehaviorWeight", "SequenceMask",
           "OffPolicySequenceMask", "GammaWeight", "LogRatioPenalty", "Mask", "Form", "Gate", "MASKS", "FORMS",
           "GATES", "PENALTIES", "ESTIMATORS", "DIVERGENCES", "estimate", "MAX_LOG_RATIO", "INF"]

INF = math.inf
# exp(20) ≈ 4.9e8: keeps r finite in fp32 whatever the log-ratio (Stable-RL clamps the log-ratio at 20 as well).
MAX_LOG_RATIO = 20.0

# What a token or sequence trust region can threshold: D(anchor ‖ π) estimates of §4.4 (Eqs. 13–16), and KPop's
# symmetric Bernoulli KL max(D_B(μ‖π), D_B(π‖μ)) (prime-rl PR #3283).
DIVERGENCES = ("binary_tv", "binary_kl", "binary_kl_max", "topk_tv", "topk_kl")
ESTIMATORS = ("ratio",) + DIVERGENCES
SIDES = ("away", "any")


def _need(ok: bool, part: object, msg: str) -> None:
    if not ok:
        raise ValueError(f"{type(part).__name__}: {msg}")


def _number(part: object, field: str, *, positive: bool = True, finite: bool = False) -> float:
    v = getattr(part, field)
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v), part,
          f"{field} must be a number, got {v!r}")
    if positive:
        _need(v > 0, part, f"{field} = {v!r} must be > 0" + ("" if finite else " (use float('inf') to switch it off)"))
    if finite:
        _need(math.isfinite(v), part, f"{field} = {v!r} must be finite")
    return float(v)


def _one_of(part: object, field: str, allowed: tuple[str, ...]) -> None:
    v = getattr(part, field)
    _need(v in allowed, part, f"unknown {field} {v!r}; choose one of {allowed}")


def estimate(estimator: str, logp: Tensor, anchor_logp: Tensor, topk: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """D_t of one estimator (fp32, no grad) between π (``logp``) and the anchor. ``"ratio"``: |π/anchor − 1| (PPO's
    one-sample TV estimate, Eq. 11). Top-K reads the rollout's top-K (its μ log-probs) whatever the anchor."""
    if estimator == "binary_tv":
        return div.binary_tv(logp, anchor_logp)
    if estimator == "binary_kl":
        return div.binary_kl(logp, anchor_logp)
    if estimator == "binary_kl_max":
        return torch.maximum(div.binary_kl(logp, anchor_logp), div.binary_kl(anchor_logp, logp))
    if estimator == "ratio":
        return torch.expm1((logp - anchor_logp).clamp(max=MAX_LOG_RATIO)).abs()
    if estimator not in ("topk_tv", "topk_kl"):
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if topk is None:
        raise ValueError(f"estimator {estimator!r} needs the top-K log-probs (logp_at_rollout_topk, "
                         "rollout_topk_logp, sampled_in_topk)")
    fn = div.topk_tv if estimator == "topk_tv" else div.topk_kl
    return fn(logp, anchor_logp, *topk)


def _topk(ctx: TokenContext) -> tuple[Tensor, Tensor, Tensor] | None:
    if ctx.logp_at_rollout_topk is None:
        return None
    return ctx.logp_at_rollout_topk, ctx.rollout_topk_logp, ctx.sampled_in  # type: ignore[return-value]


def part_fields(part: object) -> dict[str, object]:
    """A part's numbers and choices, by field name (what method.json records after its KIND)."""
    return {f.name: getattr(part, f.name) for f in fields(part)}  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Token masks: (M_t, D_t) = mask.apply(lp, ctx), M_t ∈ {0, 1} in lp's dtype, D_t fp32; both detached.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoMask:
    """M_t = 1: no token trust region (PG-IS, CISPO, DRPO, TRM, VESPO, DRO). D_t is the Binary-TV |π − anchor|, a
    diagnostic (metric ``div_mean``)."""

    KIND: ClassVar[str] = "none"
    needs_topk: ClassVar[bool] = False

    def apply(self, lp: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        return torch.ones_like(lp), div.binary_tv(lp, ctx.anchor_logp)


@dataclass(frozen=True)
class RatioMask:
    """PPO's ratio mask on ρ = π/anchor (the zero-gradient region of PPO-clip, :func:`dppo.trust_region.ratio_mask`):

        M_t = 0  if  (Â_t > 0 and ρ_t > 1 + ε_high and anchor(a_t) ≥ α_high) or (Â_t < 0 and ρ_t < 1 − ε_low and
                      anchor(a_t) ≥ α_low)

    ε_low = ε_high = 0.2 is PPO/GRPO, ε_high = 0.28 DAPO's clip-higher (§5.1); α = ``relax_*_below`` > 0 exempts
    tokens the anchor gives less than α on that side (§6 "Relax-low/high/both", Fig. 7: α = 0.1). D_t = |ρ_t − 1|.
    ``sides="any"`` drops the Â conditions."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    relax_low_below: float = 0.0
    relax_high_below: float = 0.0
    sides: Literal["away", "any"] = "away"
    KIND: ClassVar[str] = "ratio"
    needs_topk: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _number(self, "eps_low")
        _number(self, "eps_high")
        for f in ("relax_low_below", "relax_high_below"):
            v = _number(self, f, positive=False)
            _need(0.0 <= v <= 1.0, self, f"{f} = {v!r} must be a probability in [0, 1] (0 = no relaxation)")
        _one_of(self, "sides", SIDES)

    @property
    def relaxed(self) -> bool:
        return self.relax_low_below > 0 or self.relax_high_below > 0

    def apply(self, lp: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        anchor = ctx.anchor_logp
        est = estimate("ratio", lp, anchor, None)
        mask = ratio_mask(lp, anchor, ctx.advantages, self.eps_low, self.eps_high,
                          relax_low_below=self.relax_low_below, relax_high_below=self.relax_high_below,
                          sides=self.sides)
        return mask.to(lp.dtype), est


@dataclass(frozen=True)
class DivergenceMask:
    """DPPO's divergence mask (Eq. 12, :func:`dppo.trust_region.dppo_mask`), a threshold per side:

        M_t = 0  if  (Â_t > 0 and π > anchor and D_t > δ_high) or (Â_t < 0 and π < anchor and D_t > δ_low)

    with D_t the ``estimator``: ``binary_tv`` |π − anchor| (Eq. 13), ``binary_kl`` the Bernoulli KL (Eq. 14),
    ``topk_tv``/``topk_kl`` over the rollout's top-K ∪ {a_t} ∪ {other} (Eqs. 15–16; needs ``Method.topk`` ≥ 1), or
    ``binary_kl_max`` = max(D_B(anchor‖π), D_B(π‖anchor)) (KPop). ``sides="any"`` drops the Â conditions: a token
    is masked when D_t exceeds its side's δ whatever Â (IPO, prime-rl PR #2798; KPop, PR #3283)."""

    estimator: Literal["binary_tv", "binary_kl", "binary_kl_max", "topk_tv", "topk_kl"] = "binary_tv"
    delta_low: float = 0.15
    delta_high: float = 0.15
    sides: Literal["away", "any"] = "away"
    KIND: ClassVar[str] = "divergence"

    def __post_init__(self) -> None:
        _one_of(self, "estimator", DIVERGENCES)
        _number(self, "delta_low")
        _number(self, "delta_high")
        _one_of(self, "sides", SIDES)

    @property
    def needs_topk(self) -> bool:
        return self.estimator.startswith("topk")

    def apply(self, lp: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        anchor = ctx.anchor_logp
        est = estimate(self.estimator, lp, anchor, _topk(ctx))
        mask = dppo_mask(est, lp, anchor, ctx.advantages, self.delta_low, self.delta_high, sides=self.sides)
        return mask.to(lp.dtype), est


# ---------------------------------------------------------------------------------------------------------------
# Loss forms: ℓ_t = form.loss(m, lp, lp_d, ctx, mask, gate, weight), differentiable in lp only; lp_d = sg(lp).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IS:
    """ℓ_t = −Â_t·M_t·G_t·w_t·exp(x_t − sg(x_t)), x_t = log π_θ(a_t): value −Â·M·G·min(r, C), gradient
    −Â·M·G·min(r, C)·∇log π (Eq. 23, App. C.1), since exp(x − sg(x)) = 1 with gradient ∇x."""

    KIND: ClassVar[str] = "is"

    def loss(self, m: Method, lp: Tensor, lp_d: Tensor, ctx: TokenContext, mask: Tensor, gate: Tensor,
             weight: Tensor) -> Tensor:
        return -ctx.advantages * (mask * gate) * weight * torch.exp(lp - lp_d)


@dataclass(frozen=True)
class PPOClip:
    """PPO's min form on ρ = π/anchor with the RatioMask's ε (the mask is then its zero-gradient region, reported in
    the metrics): ℓ_t = −sg(w_t/ρ_t)·G_t·min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t). Where unclipped its
    gradient is −w_t·G_t·Â_t·∇log π, the IS form's (tested); with anchor="recompute" and C = ∞, w/ρ = π_θ′/μ, the
    decoupled-PPO correction that IcePop and VACO band or cap through a BehaviorWeight."""

    KIND: ClassVar[str] = "ppo_clip"

    def loss(self, m: Method, lp: Tensor, lp_d: Tensor, ctx: TokenContext, mask: Tensor, gate: Tensor,
             weight: Tensor) -> Tensor:
        eps = m.mask
        assert isinstance(eps, RatioMask)  # Method checks it
        adv = ctx.advantages
        rho = torch.exp((lp - ctx.anchor_logp).clamp(max=MAX_LOG_RATIO))
        clipped = rho.clamp(1.0 - min(eps.eps_low, 1.0), 1.0 + eps.eps_high)
        surrogate = torch.minimum(rho * adv, clipped * adv)
        return -(weight / rho.detach()) * surrogate * gate


@dataclass(frozen=True)
class DRPO:
    """DRPO's smooth Binary-TV penalty (arXiv 2606.09821) instead of a cap: with ρ = π/anchor,

        ℓ_t = (−Â_t ρ_t + |Â_t|·anchor(a_t)·(ρ_t − 1)²/(2δ)) · M_t · G_t,

    whose gradient weight 1 − sign(Â(ρ−1))·|π − anchor|/δ reaches 0 at |π − anchor| = δ (DPPO-Binary-TV's boundary
    for δ = 0.15)."""

    delta: float = 0.15
    KIND: ClassVar[str] = "drpo"

    def __post_init__(self) -> None:
        _number(self, "delta")

    def loss(self, m: Method, lp: Tensor, lp_d: Tensor, ctx: TokenContext, mask: Tensor, gate: Tensor,
             weight: Tensor) -> Tensor:
        adv, anchor = ctx.advantages, ctx.anchor_logp
        rho = torch.exp((lp - anchor).clamp(max=MAX_LOG_RATIO))
        penalty = adv.abs() * torch.exp(anchor) * (rho - 1.0) ** 2 / (2.0 * self.delta)
        return (-adv * rho + penalty) * (mask * gate)


@dataclass(frozen=True)
class PG:
    """The plain policy-gradient surrogate, no token IS weight: ℓ_t = −Â_t·M_t·G_t·log π_θ(a_t), gradient
    −Â·M·G·∇log π. VESPO puts its sequence weight φ(w) in G (trl#5199: ``−φ(w)·A·log π``); DRO adds a
    LogRatioPenalty (verl#7245: ``−(log π·A − ½β(log π − log π_old)²)``)."""

    KIND: ClassVar[str] = "pg"

    def loss(self, m: Method, lp: Tensor, lp_d: Tensor, ctx: TokenContext, mask: Tensor, gate: Tensor,
             weight: Tensor) -> Tensor:
        return -ctx.advantages * (mask * gate) * lp


# ---------------------------------------------------------------------------------------------------------------
# Gates: detached multiplicative weights. Token gates: g_t = gate.weight(ctx). Sequence gates: (S [B, T], over [B]) =
# gate.keep(lp_d, ctx, old_logp, resp), with over = the sequences whose statistic crossed the gate's threshold.
# ---------------------------------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, resp: Tensor) -> Tensor:
    """Per-sequence mean over the response tokens, Σ_t x·m / max(Σ_t m, 1) (padding may hold ±inf: filled first)."""
    m = resp.to(x.dtype)
    return x.masked_fill(~resp, 0.0).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)


@dataclass(frozen=True)
class BehaviorWeight:
    """A weight on the behaviour ratio b_t = π_θ′(a_t)/μ(a_t) (the recomputed old policy over the rollout, detached;
    needs anchor="recompute"): g_t = band(b_t)·min(b_t, cap)/b_t with band(b) = 1[low ≤ b ≤ high], whatever Â.
    IcePop (arXiv 2510.18855; slime ``icepop_function``): band [0.5, 5]. VACO (open-instruct PR #1755's
    ``rho_clamp_upper_bound``): cap 2. On a PPOClip form with C = ∞ the kept token's weight becomes
    band(b)·min(b, cap), the weight IcePop and VACO put on the PPO-clip loss on π/π_θ′."""

    low: float = 0.0
    high: float = INF
    cap: float = INF
    KIND: ClassVar[str] = "behavior"
    per_sequence: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _need(_number(self, "low", positive=False) >= 0 and math.isfinite(self.low), self,
              f"low = {self.low!r} must be a finite number >= 0 (0 = no lower band edge)")
        _number(self, "high")
        _number(self, "cap")
        _need(self.low < self.high, self, f"low = {self.low!r} must be < high = {self.high!r}")
        _need(self.low > 0 or self.high != INF or self.cap != INF, self,
              "low = 0, high = inf and cap = inf weigh every token by 1; leave the gate out instead")

    def weight(self, ctx: TokenContext) -> Tensor:
        b = torch.exp((ctx.anchor_logp - ctx.rollout_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        band = (b >= self.low) & (b <= self.high)
        return torch.where(band, b.clamp(max=self.cap) / b, torch.zeros_like(b))


@dataclass(frozen=True)
class SequenceMask:
    """A sequence-level trust region (:func:`dppo.trust_region.sequence_mask`): the sequence's statistic, ``reduce``
    over its response tokens of ``estimator`` between (p, q) = (π_θ, anchor) for ``policy="current"`` or (π_θ′, μ)
    for ``"old"``, above δ drops the whole sequence (``sides="all"``) or its tokens moving away,
    sign(log p − log q)·Â > 0 (``"away"``, open-instruct PR #1755's ``moving_away``).

    TRM (arXiv 2512.23075): max, current, all. VACO (arXiv 2603.01365 as open-instruct implements it): mean of the
    Binary-TV, old, away. ``policy="current"`` is a function of the whole sequence's π_θ, so the fused path takes
    two passes for it; ``"old"`` needs ``old_logp`` and a binary or ratio estimator (π_θ′ at the top-K ids is not
    recorded)."""

    estimator: Literal["ratio", "binary_tv", "binary_kl", "binary_kl_max", "topk_tv", "topk_kl"] = "binary_kl"
    delta: float = 0.05
    reduce: Literal["max", "mean"] = "max"
    policy: Literal["current", "old"] = "current"
    sides: Literal["all", "away"] = "all"
    KIND: ClassVar[str] = "sequence"
    per_sequence: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _one_of(self, "estimator", ESTIMATORS)
        _number(self, "delta", finite=True)
        _one_of(self, "reduce", ("max", "mean"))
        _one_of(self, "policy", ("current", "old"))
        _one_of(self, "sides", ("all", "away"))
        _need(self.policy != "old" or not self.estimator.startswith("topk"), self,
              "policy='old' measures π_θ′ against μ, and π_θ′ at the rollout's top-K ids is not recorded; use a "
              "binary or ratio estimator")

    @property
    def reads_current(self) -> bool:
        return self.policy == "current"

    @property
    def needs_old_logp(self) -> bool:
        return self.policy == "old"

    @property
    def needs_topk(self) -> bool:
        return self.estimator.startswith("topk")

    def keep(self, lp: Tensor | None, ctx: TokenContext, old_logp: Tensor | None, resp: Tensor
             ) -> tuple[Tensor, Tensor]:
        adv = ctx.advantages
        if self.policy == "current":
            assert lp is not None
            p, q, topk = lp, ctx.anchor_logp, _topk(ctx)
        else:
            assert old_logp is not None
            p, q, topk = old_logp.detach().to(adv.dtype), ctx.rollout_logp, None
        d = estimate(self.estimator, p, q, topk)
        over = sequence_mask(d, resp, self.delta, reduce=self.reduce) == 0
        drop = over[:, None].expand_as(adv)
        if self.sides == "away":
            drop = drop & (torch.sign(p - q) * adv > 0)
        return (~drop).to(adv.dtype), over


@dataclass(frozen=True)
class OffPolicySequenceMask:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, Eq. 9), as trl#4689 ``off_policy_mask_threshold``
    defines it (``GRPOTrainer.get_off_policy_mask``): with the per-sequence mean over its response tokens of the
    one-sample KL estimate k₁ = log μ(a_t) − log π_θ(a_t) (π_θ the current policy, detached),

        S_t = 0  if  Â_t < 0 and mean_t k₁ > δ,   else 1

    (TRL keeps a token when Â ≥ 0 or the mean ≤ δ; a per-token Â [B, T] is tested per token there too). A function
    of the whole sequence's π_θ: the fused path takes two passes for it."""

    delta: float = 0.5
    KIND: ClassVar[str] = "offpolicy"
    per_sequence: ClassVar[bool] = True
    reads_current: ClassVar[bool] = True
    needs_old_logp: ClassVar[bool] = False
    needs_topk: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _need(_number(self, "delta", positive=False) >= 0 and math.isfinite(self.delta), self,
              f"delta = {self.delta!r} must be a finite number >= 0")

    def keep(self, lp: Tensor | None, ctx: TokenContext, old_logp: Tensor | None, resp: Tensor
             ) -> tuple[Tensor, Tensor]:
        assert lp is not None
        adv = ctx.advantages
        over = _masked_mean(ctx.rollout_logp - lp, resp) > self.delta
        drop = over[:, None] & (adv < 0)
        return (~drop).to(adv.dtype), over


@dataclass(frozen=True)
class GammaWeight:
    """VESPO's sequence weight (arXiv 2602.10693; trl#5199 ``get_gamma_weights``): with the sequence-level ratio
    w = Π_t π_θ(a_t)/μ(a_t) over the response (log w = Σ_t clamp(log π − log μ, ±20), then clamped to
    [log 1e-8, 20]), S_t = φ(w) = e^λ·w^k·e^(−λw) (φ(1) = 1), computed as exp(λ + k·log w − λ·w), with
    (k, λ) = (k_pos, λ_pos) where Â_t ≥ 0 and (k_neg, λ_neg) where Â_t < 0; NaN/inf → 0. Detached: it scales the
    PG form's gradient, −φ(w)·Â·∇log π. A function of the whole sequence's π_θ: the fused path takes two passes."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0
    KIND: ClassVar[str] = "gamma"
    per_sequence: ClassVar[bool] = True
    reads_current: ClassVar[bool] = True
    needs_old_logp: ClassVar[bool] = False
    needs_topk: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in ("k_pos", "k_neg"):
            _need(_number(self, f, positive=False) >= 0 and math.isfinite(getattr(self, f)), self,
                  f"{f} = {getattr(self, f)!r} must be a finite number >= 0")
        for f in ("lambda_pos", "lambda_neg"):
            _number(self, f, finite=True)

    def keep(self, lp: Tensor | None, ctx: TokenContext, old_logp: Tensor | None, resp: Tensor
             ) -> tuple[Tensor, Tensor]:
        assert lp is not None
        adv = ctx.advantages
        log_r = (lp - ctx.rollout_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).masked_fill(~resp, 0.0)
        log_w = log_r.sum(dim=-1, keepdim=True).clamp(math.log(1e-8), MAX_LOG_RATIO)
        pos = adv >= 0
        k = torch.where(pos, self.k_pos, self.k_neg).to(adv.dtype)
        lam = torch.where(pos, self.lambda_pos, self.lambda_neg).to(adv.dtype)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), torch.zeros(adv.shape[0], dtype=torch.bool,
                                                                             device=adv.device)


# ---------------------------------------------------------------------------------------------------------------
# Penalty: added to ℓ_t on every response token, masked or not.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogRatioPenalty:
    """κ·(log π_θ(a_t) − log μ(a_t))², log-ratio clamped at ±20; gradient 2κ·log r·∇log π. IPO's ``kl_tau`` term
    (Kimi-K2.5, arXiv 2602.02276, as prime-rl applies it: on the whole loss mask), KPop's (prime-rl PR #3283) and
    DRO's ½β(log π − log π_old)² (verl#7245; κ = β/2, π_old = μ in bypass mode)."""

    coef: float = 1e-3
    KIND: ClassVar[str] = "log_ratio"

    def __post_init__(self) -> None:
        _number(self, "coef", finite=True)

    def loss(self, lp: Tensor, ctx: TokenContext) -> Tensor:
        log_r = (lp - ctx.rollout_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return self.coef * log_r**2


Mask = Union[NoMask, RatioMask, DivergenceMask]
Form = Union[IS, PPOClip, DRPO, PG]
Gate = Union[BehaviorWeight, SequenceMask, OffPolicySequenceMask, GammaWeight]
MASKS = {c.KIND: c for c in (NoMask, RatioMask, DivergenceMask)}
FORMS = {c.KIND: c for c in (IS, PPOClip, DRPO, PG)}
GATES = {c.KIND: c for c in (BehaviorWeight, SequenceMask, OffPolicySequenceMask, GammaWeight)}
PENALTIES = {c.KIND: c for c in (LogRatioPenalty,)}
