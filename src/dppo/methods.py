"""A policy-loss method is data: estimator + anchor + thresholds + cap + aggregation (+ loss form, gates, penalty).

Every method of the paper reduces to the unified gradient of Eq. 23 (App. C.1),

    ∇L(θ) = E_{y∼μ}[ Σ_t M_t · min(π_θ(y_t)/μ_θ′(y_t), C) · Â_t · ∇_θ log π_θ(y_t) ],

differing only in the mask M_t (which estimator, against which anchor, which thresholds) and the cap C. DRPO swaps the
hard mask for a smooth penalty (``loss_form="drpo"``); TRM adds a sequence-level mask (``seq_delta``). The newer
trust regions beside DPPO are the same data with a few more fields: IPO masks both directions (``mask_sides="any"``)
and adds a squared-log-ratio penalty (``kl_coef``); IcePop and VACO weight the PPO-clip loss on π/π_θ′ by the
behaviour ratio π_θ′/μ, banded (``behavior_low/high``) or capped (``behavior_cap``), and VACO gates tokens by the
sequence's mean behaviour divergence (``seq_reduce="mean"``, ``seq_policy="old"``, ``seq_sides="away"``).

Two named settings of the paper: presets without a suffix carry the §5.1 sanity-test values (App. C), ``-scaling``
presets the §7 scaling-run values (App. E/F; C = 5 throughout).

Customise a preset with :func:`dataclasses.replace`::

    m = dataclasses.replace(PRESETS["dppo-binary-tv"], delta_low=0.2, delta_high=0.2, ratio_cap=5.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["Method", "PRESETS", "get_method", "method_from_spec", "ESTIMATORS", "AGGREGATIONS"]

INF = math.inf

ESTIMATORS = ("none", "ratio", "binary_tv", "binary_kl", "topk_tv", "topk_kl")
DIVERGENCES = ("binary_tv", "binary_kl", "topk_tv", "topk_kl")
ANCHORS = ("rollout", "recompute")
LOSS_FORMS = ("is", "ppo_clip", "drpo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum")
MASK_SIDES = ("away", "any")
SEQ_REDUCES = ("max", "mean")
SEQ_POLICIES = ("current", "old")
SEQ_SIDES = ("all", "away")

Estimator = Literal["none", "ratio", "binary_tv", "binary_kl", "topk_tv", "topk_kl"]
Anchor = Literal["rollout", "recompute"]
LossForm = Literal["is", "ppo_clip", "drpo"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"]


@dataclass(frozen=True)
class Method:
    """One policy-loss method. Field defaults are DPPO-Binary-TV's sanity-test values (§5.1, App. C).

    Attributes:
        name: label used in logs.
        estimator: what the token mask thresholds. ``"binary_tv"``/``"binary_kl"`` (Eqs. 13–14),
            ``"topk_tv"``/``"topk_kl"`` (Eqs. 15–16) give DPPO's divergence mask (Eq. 12); ``"ratio"`` gives PPO's
            ratio mask with δ read as ε (r > 1+ε_high / r < 1−ε_low); ``"none"`` masks nothing (PG-IS, CISPO, DRPO).
        anchor: the policy the trust region is centred on. ``"rollout"`` = μ_θ′, the inference engine's log-probs at
            sampling time (the paper's choice for every method, §5.2, App. E); ``"recompute"`` = π_θ′, the trainer's
            recomputed log-probs before the update (MiniRL; the Fig. 4 "decoupled" ablation; IcePop, VACO). The IS
            weight min(π/μ, C) always uses the rollout μ (Eq. 23).
        delta_low: threshold of the negative side (Â < 0, π falling); δ for divergences, ε for ``"ratio"``.
        delta_high: threshold of the positive side (Â > 0, π rising). ``inf`` disables a side.
        mask_sides: ``"away"`` = Eq. 12: block a token only when its update moves π away from the anchor in the
            direction Â pushes (Â > 0 and π above, or Â < 0 and π below). ``"any"`` = block every token whose
            estimate exceeds the threshold of its side (δ_high above the anchor, δ_low below), whatever Â: IPO's
            symmetric mask (prime-rl ``ipo_loss_fn``, PR #2798; #1930: "we mask independently of the advantage
            sign"). Needs ``loss_form="is"`` and an estimator.
        ratio_cap: C in min(r, C) (Eq. 23). ``inf`` = no truncation: the paper's DPPO sanity test; C = 5 in the scaling
            runs (§7). §5.4 finds truncation at C = 3 hurts.
        relax_low_below / relax_high_below: α; tokens whose anchor probability is below α are exempt from that side
            of a ``"ratio"`` mask (§6, Fig. 7: α = 0.1).
        behavior_low / behavior_high: IcePop's band [α, β] on the behaviour ratio b_t = π_θ′(a_t)/μ(a_t) (recomputed
            old policy over rollout, detached): a token with b_t outside the band gets weight 0, whatever Â
            (arXiv 2510.18855; slime ``icepop_function``). 0 / ``inf`` = no band. Needs ``anchor="recompute"``.
        behavior_cap: truncate b_t at this value (VACO as in open-instruct PR #1755: ``rho_clamp_upper_bound`` = 2).
            ``inf`` = no cap. Needs ``anchor="recompute"``. Band and cap multiply the whole token loss by
            band(b)·min(b, cap)/b, so a kept token's gradient weight becomes min(π/μ, C)·min(b, cap)/b: for the
            PPO-clip form with C = ∞ that is band(b)·min(b, cap), the weight IcePop and VACO put on the PPO-clip
            loss on π/π_θ′.
        seq_estimator / seq_delta: a sequence-level gate: a sequence's statistic (``seq_reduce`` over its response
            tokens of ``seq_estimator``) above ``seq_delta`` drops the sequence (``seq_sides="all"``) or its tokens
            that move away (``"away"``). ``inf`` = off. TRM (arXiv 2512.23075): max, current policy, all.
        seq_reduce: ``"max"`` (TRM) or ``"mean"`` (VACO, arXiv 2603.01365) over the response tokens.
        seq_policy: whose divergence the gate measures. ``"current"`` = D(anchor ‖ π_θ) of the policy being updated
            (TRM; a sequence-level function of π_θ, so :func:`dppo.policy_loss_from_hidden` falls back to two
            passes for it); ``"old"`` = D(μ ‖ π_θ′) of the recomputed old policy against the rollout (VACO; known
            before the update). ``"old"`` needs ``old_logp`` and a binary or ratio ``seq_estimator``.
        seq_sides: ``"all"`` = drop the whole sequence; ``"away"`` = drop only its tokens whose move from the
            reference is along Â: sign(log p − log q)·Â > 0 with (p, q) = (π_θ, anchor) or (π_θ′, μ)
            (open-instruct PR #1755's ``moving_away``).
        loss_form: ``"is"`` = −Â·sg(min(r, C))·M·log π (Eq. 23); ``"ppo_clip"`` = the PPO min(r·Â, clip(r)·Â) form
            on r = π/anchor (same gradient, needs ``estimator="ratio"``); ``"drpo"`` = DRPO's smooth penalty
            −Â·r + |Â|·μ·(r−1)²/(2δ) with δ = ``drpo_delta`` (DRPO, arXiv 2606.09821).
        drpo_delta: δ of DRPO, in Binary-TV units: the gradient weight 1 − sign(Â(r−1))·|π−μ|/δ reaches 0 at |π−μ| = δ.
        kl_coef: τ of a penalty τ·(log π(a_t) − log μ(a_t))² added on every response token, masked or not (the
            Kimi-K2.5 term, arXiv 2602.02276, as prime-rl's IPO ``kl_tau`` applies it; 0 = off). Its gradient is
            2τ·(log π − log μ)·∇log π.
        aggregation: how token losses become one scalar (see :func:`dppo.loss.aggregate`).
        max_len_norm: the constant L of ``"seq-mean-token-sum-norm"`` (Dr.GRPO); None = the batch's T.
        topk: how many rollout top-K ids/log-probs the rollout must record (K = 20 in the paper, §4.4, the most vLLM
            returns); 0 for methods that need none.
    """

    name: str = "dppo-binary-tv"
    estimator: Estimator = "binary_tv"
    anchor: Anchor = "rollout"
    delta_low: float = 0.15
    delta_high: float = 0.15
    mask_sides: Literal["away", "any"] = "away"
    ratio_cap: float = INF
    relax_low_below: float = 0.0
    relax_high_below: float = 0.0
    behavior_low: float = 0.0
    behavior_high: float = INF
    behavior_cap: float = INF
    seq_estimator: Estimator = "binary_kl"
    seq_delta: float = INF
    seq_reduce: Literal["max", "mean"] = "max"
    seq_policy: Literal["current", "old"] = "current"
    seq_sides: Literal["all", "away"] = "all"
    loss_form: LossForm = "is"
    drpo_delta: float = 0.15
    kl_coef: float = 0.0
    aggregation: Aggregation = "seq-mean-token-sum-norm"
    max_len_norm: int | None = None
    topk: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"Method {self.name!r}: {msg}")

        def number(field: str) -> float:
            v = getattr(self, field)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
                 f"{field} must be a number, got {v!r}")
            return float(v)

        for field, allowed in (("estimator", ESTIMATORS), ("anchor", ANCHORS), ("loss_form", LOSS_FORMS),
                               ("aggregation", AGGREGATIONS), ("mask_sides", MASK_SIDES),
                               ("seq_reduce", SEQ_REDUCES), ("seq_policy", SEQ_POLICIES), ("seq_sides", SEQ_SIDES)):
            v = getattr(self, field)
            need(v in allowed, f"unknown {field} {v!r}; choose one of {allowed}")
        for field in ("delta_low", "delta_high", "seq_delta", "drpo_delta", "ratio_cap", "behavior_high",
                      "behavior_cap"):
            need(number(field) > 0, f"{field} = {getattr(self, field)!r} must be > 0 (use float('inf') to switch it off)")
        need(number("behavior_low") >= 0 and math.isfinite(self.behavior_low),
             f"behavior_low = {self.behavior_low!r} must be a finite number >= 0 (0 = no lower band edge)")
        need(self.behavior_low < self.behavior_high,
             f"behavior_low = {self.behavior_low!r} must be < behavior_high = {self.behavior_high!r}")
        need(number("kl_coef") >= 0 and math.isfinite(self.kl_coef),
             f"kl_coef = {self.kl_coef!r} must be a finite number >= 0 (0 = no penalty)")
        for field in ("relax_low_below", "relax_high_below"):
            v = number(field)
            need(0.0 <= v <= 1.0, f"{field} = {v!r} must be a probability in [0, 1] (0 = no relaxation)")
        need(
            self.estimator == "ratio" or (self.relax_low_below == 0 and self.relax_high_below == 0),
            "relax_low_below/relax_high_below only apply to the ratio mask; set estimator='ratio' or set them to 0",
        )
        need(
            self.seq_estimator in ("ratio",) + DIVERGENCES,
            f"seq_estimator {self.seq_estimator!r} must be one of {('ratio',) + DIVERGENCES}",
        )
        need(
            self.loss_form != "ppo_clip" or self.estimator == "ratio",
            "loss_form='ppo_clip' is the PPO min-form of a ratio mask; set estimator='ratio' or use loss_form='is'",
        )
        need(
            self.loss_form != "ppo_clip" or (self.relax_low_below == 0 and self.relax_high_below == 0),
            "loss_form='ppo_clip' has no relaxed form; use loss_form='is' for the relax ablations",
        )
        need(
            self.loss_form != "drpo" or self.ratio_cap == INF,
            "DRPO's penalty replaces the cap; set ratio_cap=float('inf') with loss_form='drpo'",
        )
        need(
            self.mask_sides == "away" or (self.loss_form == "is" and self.estimator != "none"),
            "mask_sides='any' masks by the estimate alone and needs loss_form='is' and an estimator other than "
            "'none' (PPO's min-form is one-sided by construction)",
        )
        has_behavior = self.behavior_low > 0 or self.behavior_high != INF or self.behavior_cap != INF
        need(
            not has_behavior or self.anchor == "recompute",
            "behavior_low/behavior_high/behavior_cap act on b = π_θ′/μ, which is 1 with anchor='rollout'; set "
            "anchor='recompute' or leave them at 0/inf/inf",
        )
        need(
            not has_behavior or self.loss_form != "drpo",
            "the behaviour band/cap weights an 'is' or 'ppo_clip' loss; DRPO's penalty has no such weight",
        )
        need(
            self.seq_policy != "old" or not self.seq_estimator.startswith("topk"),
            "seq_policy='old' measures π_θ′ against μ, and π_θ′ at the rollout's top-K ids is not recorded; use a "
            "binary or ratio seq_estimator",
        )
        need(
            self.max_len_norm is None or (isinstance(self.max_len_norm, int) and self.max_len_norm > 0),
            f"max_len_norm must be None or a positive int, got {self.max_len_norm!r}",
        )
        need(
            not (self.anchor == "recompute" and self.needs_topk),
            "a top-K estimator anchored to the recomputed policy would need π_θ′ at the top-K ids, which only the "
            "rollout records (as μ); use anchor='rollout' or a binary estimator",
        )
        need(isinstance(self.topk, int) and self.topk >= 0, f"topk must be an int >= 0, got {self.topk!r}")
        need(
            not self.needs_topk or self.topk >= 1,
            "a top-K estimator needs topk >= 1 (the number of rollout top-K log-probs to record; the paper uses 20)",
        )

    @property
    def has_seq_gate(self) -> bool:
        return self.seq_delta != INF

    @property
    def needs_topk(self) -> bool:
        """True if the loss needs ``topk_logp``, ``rollout_topk_logp`` and ``sampled_in_topk``."""
        return self.estimator.startswith("topk") or (self.has_seq_gate and self.seq_estimator.startswith("topk"))

    @property
    def needs_old_logp(self) -> bool:
        """True if the loss needs the recomputed π_θ′ (an extra forward pass before the update)."""
        return self.anchor == "recompute" or (self.has_seq_gate and self.seq_policy == "old")

    @property
    def single_pass(self) -> bool:
        """True if every token's loss gradient is known from that token's own statistics and quantities fixed before
        the update, so :func:`dppo.policy_loss_from_hidden` can fuse it; False for a sequence gate on the current
        policy (TRM), whose value needs the whole sequence's log π_θ first."""
        return not (self.has_seq_gate and self.seq_policy == "current")


def _m(name: str, **kw: object) -> Method:
    return Method(name=name, **kw)  # type: ignore[arg-type]


# GRPO-ClipHigher's ε (DAPO clip-higher): 0.2/0.28 in the §5.1 sanity test; 0.2/0.27 in the §7 scaling runs
# (following Zheng et al. 2025).
_CLIP_HIGHER = dict(estimator="ratio", delta_low=0.2, delta_high=0.28)
_CLIP_HIGHER_SCALING = dict(estimator="ratio", delta_low=0.2, delta_high=0.27)
# §7 / App. E: "C = 5" for DPPO, GRPO and CISPO in every scaling run.
_C_SCALING = 5.0

PRESETS: dict[str, Method] = {
    # --- §5.1 sanity test (App. C): δ_TV = 0.15, δ_KL = 0.05, C = ∞ for DPPO; GRPO ε 0.2/0.28; CISPO C = 3. ---
    # DPPO, §4 (Eqs. 12–14), thresholds of §5.1.
    "dppo-binary-tv": _m("dppo-binary-tv", estimator="binary_tv", delta_low=0.15, delta_high=0.15),
    "dppo-binary-kl": _m("dppo-binary-kl", estimator="binary_kl", delta_low=0.05, delta_high=0.05),
    # Top-K (Eqs. 15–16), K = 20 (§4.4). The sanity test has no Top-K run: δ_TV = 0.15 and δ_KL = 0.05 are *ours*,
    # §5.1's Binary thresholds carried over so that Binary and Top-K compare at equal δ; C = ∞ as §5.1's DPPO.
    "dppo-topk-tv": _m("dppo-topk-tv", estimator="topk_tv", delta_low=0.15, delta_high=0.15, topk=20),
    "dppo-topk-kl": _m("dppo-topk-kl", estimator="topk_kl", delta_low=0.05, delta_high=0.05, topk=20),
    # Fig. 4 "decoupled" ablation: the same masks anchored to the recomputed π_θ′ instead of μ_θ′ (§5.2).
    "dppo-binary-tv-recompute": _m(
        "dppo-binary-tv-recompute", estimator="binary_tv", anchor="recompute", delta_low=0.15, delta_high=0.15
    ),
    "dppo-binary-kl-recompute": _m(
        "dppo-binary-kl-recompute", estimator="binary_kl", anchor="recompute", delta_low=0.05, delta_high=0.05
    ),
    # GRPO: PPO ratio mask, ε = 0.2 both sides (Shao et al. 2024), anchored to μ like every baseline (App. E).
    "grpo": _m("grpo", estimator="ratio", delta_low=0.2, delta_high=0.2, loss_form="ppo_clip"),
    # GRPO-ClipHigher: ε_low = 0.2, ε_high = 0.28, C = ∞ (§5.1 sanity test).
    "grpo-clip-higher": _m("grpo-clip-higher", **_CLIP_HIGHER, loss_form="ppo_clip"),  # type: ignore[arg-type]
    # PG-IS: M = 1, C = ∞ (App. C.1, Eq. 23 table).
    "pg-is": _m("pg-is", estimator="none"),
    # CISPO = PG-TIS: M = 1, min(r, C) with C = 3 (§5.1 sanity test, App. C.1: "TIS variants use C = 3").
    "cispo": _m("cispo", estimator="none", ratio_cap=3.0),
    # MiniRL (Zheng et al. 2025): the clip-higher mask on the recomputed ratio π_θ/π_θ′, C = ∞ (§5.1, App. C.1).
    "minirl": _m("minirl", **_CLIP_HIGHER, anchor="recompute"),  # type: ignore[arg-type]
    # MiniRL-TIS: MiniRL with C = 3 (§5.4).
    "minirl-tis": _m("minirl-tis", **_CLIP_HIGHER, anchor="recompute", ratio_cap=3.0),  # type: ignore[arg-type]
    # §5.3, Fig. 5: PG-IS plus one mask, Â < 0 and μ − π > 0.5, anchored to μ.
    "minimal-negative-mask": _m("minimal-negative-mask", estimator="binary_tv", delta_low=0.5, delta_high=INF),
    # §6, Fig. 7: GRPO-ClipHigher with ε = ∞ for tokens whose μ(a_t) < α = 0.1 on the named side(s).
    "relax-low": _m("relax-low", **_CLIP_HIGHER, relax_low_below=0.1),  # type: ignore[arg-type]
    "relax-high": _m("relax-high", **_CLIP_HIGHER, relax_high_below=0.1),  # type: ignore[arg-type]
    "relax-both": _m("relax-both", **_CLIP_HIGHER, relax_low_below=0.1, relax_high_below=0.1),  # type: ignore[arg-type]
    # --- §7 scaling runs (App. E/F): δ_TV = 0.2, δ_KL = 0.05, GRPO ε 0.2/0.27, C = 5 for DPPO, GRPO and CISPO. ---
    # DPPO Binary (§7, App. E): δ_TV = 0.2, δ_KL = 0.05, C = 5.
    "dppo-binary-tv-scaling": _m("dppo-binary-tv-scaling", estimator="binary_tv", delta_low=0.2, delta_high=0.2,
                                 ratio_cap=_C_SCALING),
    "dppo-binary-kl-scaling": _m("dppo-binary-kl-scaling", estimator="binary_kl", delta_low=0.05, delta_high=0.05,
                                 ratio_cap=_C_SCALING),
    # §7 "MoE Base w/ LoRA" (Table 1: rank 32, α 64, lr 1e-5): Binary-TV δ = 0.15 for LoRA (App. E), C = 5.
    "dppo-binary-tv-lora": _m("dppo-binary-tv-lora", estimator="binary_tv", delta_low=0.15, delta_high=0.15,
                              ratio_cap=_C_SCALING),
    # Top-K ablation (§7.3, App. F.3): K = 20, δ_TV = 0.2, δ_KL = 0.05, C = 5.
    "dppo-topk-tv-scaling": _m("dppo-topk-tv-scaling", estimator="topk_tv", delta_low=0.2, delta_high=0.2,
                               ratio_cap=_C_SCALING, topk=20),
    "dppo-topk-kl-scaling": _m("dppo-topk-kl-scaling", estimator="topk_kl", delta_low=0.05, delta_high=0.05,
                               ratio_cap=_C_SCALING, topk=20),
    # GRPO-ClipHigher in the scaling runs (§7, App. E): ε_low = 0.2, ε_high = 0.27, C = 5.
    "grpo-clip-higher-scaling": _m("grpo-clip-higher-scaling", **_CLIP_HIGHER_SCALING,  # type: ignore[arg-type]
                                   loss_form="ppo_clip", ratio_cap=_C_SCALING),
    # CISPO in the scaling runs (§7, App. E): C = 5.
    "cispo-scaling": _m("cispo-scaling", estimator="none", ratio_cap=_C_SCALING),
    # --- Follow-ups of the paper: DRPO (arXiv 2606.09821) and TRM (arXiv 2512.23075). ---
    # DRPO (arXiv 2606.09821): smooth Binary-TV penalty, no mask, no cap. δ = 0.15 is our choice so
    # the weight reaches 0 exactly on DPPO-Binary-TV's boundary; DRPO's own "12.5" is in another parameterisation.
    "drpo": _m("drpo", estimator="none", loss_form="drpo", drpo_delta=0.15),
    # TRM (arXiv 2512.23075): PG-IS with a sequence mask on the max token Binary-KL; δ = 0.05 mirrors DPPO-KL's δ
    # (TRM reports no single default for the sample-based detector).
    "trm": _m("trm", estimator="none", seq_estimator="binary_kl", seq_delta=0.05),
    # --- The field's newer trust regions (issue 13). ---
    # IPO, prime-rl's default RL loss since PR #3418 (ipo_loss_fn; read at prime-rl 559b447, #2798): a token is
    # masked iff |π − μ| > eps whatever Â; kept tokens get −Â·r, r = π/μ uncapped; + kl_tau·(log r)² on every
    # response token; Σ over tokens / the batch's token count (token-mean). eps = 0.3, kl_tau = 0: PR #3586.
    "ipo": _m("ipo", estimator="binary_tv", delta_low=0.3, delta_high=0.3, mask_sides="any", kl_coef=0.0,
              aggregation="token-mean"),
    # IPO with the defaults of PR #2798 (kept by #3418 until #3586): ipo_threshold/eps = 0.1, kl_tau = 1e-3.
    "ipo-kl": _m("ipo-kl", estimator="binary_tv", delta_low=0.1, delta_high=0.1, mask_sides="any", kl_coef=1e-3,
                 aggregation="token-mean"),
    # IcePop (Ring-1T, arXiv 2510.18855; slime icepop_function): k = π_θ′/μ (recomputed old policy over rollout),
    # weight k if α ≤ k ≤ β else 0 (α = 0.5, β = 5), times PPO-clip on π/π_θ′ with ε = 0.2. Token-mean is *ours*
    # (the 1/Σ|y| of the IcePop objective as prime-rl's IcePop branch quotes it, commit 3c3248d).
    "icepop": _m("icepop", estimator="ratio", anchor="recompute", delta_low=0.2, delta_high=0.2,
                 loss_form="ppo_clip", behavior_low=0.5, behavior_high=5.0, aggregation="token-mean"),
    # VACO (arXiv 2603.01365) as open-instruct implements it (compute_rho_correction at commit 5c2bf9a): the
    # sequence's mean Binary-TV |π_θ′ − μ| over its response; if it exceeds U, tokens with sign(log π_θ′ − log μ)·Â
    # > 0 are dropped; kept tokens weighted min(π_θ′/μ, 2) (rho_clamp_upper_bound); PPO-clip on π/π_θ′ with
    # ε = 0.2/0.272 (clip_lower/clip_higher); loss_denominator "token" = token-mean. U = 0.2 is *ours*: neither the
    # PR nor its scripts set rho_mask_upper_bound for VACO (default 0 = off), and the paper's own LLM rule could
    # not be confirmed (paper not read). Source: open-instruct PR #1755.
    "vaco": _m("vaco", estimator="ratio", anchor="recompute", delta_low=0.2, delta_high=0.272, loss_form="ppo_clip",
               behavior_cap=2.0, seq_estimator="binary_tv", seq_delta=0.2, seq_reduce="mean", seq_policy="old",
               seq_sides="away", aggregation="token-mean"),
}


def get_method(method: Method | str) -> Method:
    """A Method as is, or the preset of that name; an unknown name lists the valid ones."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        if method not in PRESETS:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[method]
    raise TypeError(f"method must be a dppo.Method or a preset name, got {type(method).__name__}")


def replace(method: Method | str, **changes: object) -> Method:
    """``dataclasses.replace`` that also accepts a preset name."""
    return dataclasses.replace(get_method(method), **changes)  # type: ignore[arg-type]


def method_from_spec(spec: str, **changes: object) -> Method:
    """A Method from ``"NAME"`` or ``"NAME@field=value,field=value"`` (``"cispo@ratio_cap=3"``), then ``changes``.
    Values are parsed as int, float (``inf`` included) or string; an unknown preset or field is a ValueError that
    names it."""
    name, _, rest = spec.partition("@")
    over: dict[str, object] = {}
    for kv in filter(None, rest.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise ValueError(f"bad override {kv!r} in {spec!r}: expected field=value")
        try:
            val: object = int(v) if v.strip().lstrip("-").isdigit() else float(v)
        except ValueError:
            val = v.strip()
        over[k.strip()] = val
    if over:
        over.setdefault("name", spec)  # the label in logs says what was overridden
    over.update(changes)
    m = get_method(name.strip())
    known = {f.name for f in dataclasses.fields(Method)}
    bad = sorted(set(over) - known)
    if bad:
        raise ValueError(f"unknown Method field(s) {', '.join(bad)} in {spec!r}; fields: {', '.join(sorted(known))}")
    return dataclasses.replace(m, **over) if over else m  # type: ignore[arg-type]
