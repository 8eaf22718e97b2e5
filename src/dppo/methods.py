"""A policy-loss method is data: estimator + anchor + thresholds + cap + aggregation (+ loss form).

Every method of the paper reduces to the unified gradient of Eq. 23 (App. C.1),

    ∇L(θ) = E_{y∼μ}[ Σ_t M_t · min(π_θ(y_t)/μ_θ′(y_t), C) · Â_t · ∇_θ log π_θ(y_t) ],

differing only in the mask M_t (which estimator, against which anchor, which thresholds) and the cap C. DRPO swaps the
hard mask for a smooth penalty (``loss_form="drpo"``); TRM adds a sequence-level mask (``seq_delta``).

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
            recomputed log-probs before the update (MiniRL; the Fig. 4 "decoupled" ablation). The IS weight
            min(π/μ, C) always uses the rollout μ (Eq. 23).
        delta_low: threshold of the negative side (Â < 0, π falling); δ for divergences, ε for ``"ratio"``.
        delta_high: threshold of the positive side (Â > 0, π rising). ``inf`` disables a side.
        ratio_cap: C in min(r, C) (Eq. 23). ``inf`` = no truncation: the paper's DPPO sanity test; C = 5 in the scaling
            runs (§7). §5.4 finds truncation at C = 3 hurts.
        relax_low_below / relax_high_below: α; tokens whose anchor probability is below α are exempt from that side
            of a ``"ratio"`` mask (§6, Fig. 7: α = 0.1).
        seq_estimator / seq_delta: TRM's sequence mask (arXiv 2512.23075): drop a whole sequence when the max over its
            tokens of ``seq_estimator`` exceeds ``seq_delta``. ``inf`` = off.
        loss_form: ``"is"`` = −Â·sg(min(r, C))·M·log π (Eq. 23); ``"ppo_clip"`` = the PPO min(r·Â, clip(r)·Â) form
            (same gradient, needs ``estimator="ratio"``); ``"drpo"`` = DRPO's smooth penalty
            −Â·r + |Â|·μ·(r−1)²/(2δ) with δ = ``drpo_delta`` (paper-notes §8).
        drpo_delta: δ of DRPO, in Binary-TV units: the gradient weight 1 − sign(Â(r−1))·|π−μ|/δ reaches 0 at |π−μ| = δ.
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
    ratio_cap: float = INF
    relax_low_below: float = 0.0
    relax_high_below: float = 0.0
    seq_estimator: Estimator = "binary_kl"
    seq_delta: float = INF
    loss_form: LossForm = "is"
    drpo_delta: float = 0.15
    aggregation: Aggregation = "seq-mean-token-sum-norm"
    max_len_norm: int | None = None
    topk: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"Method {self.name!r}: {msg}")

        need(self.estimator in ESTIMATORS, f"unknown estimator {self.estimator!r}; choose one of {ESTIMATORS}")
        need(self.anchor in ANCHORS, f"unknown anchor {self.anchor!r}; choose one of {ANCHORS}")
        need(self.loss_form in LOSS_FORMS, f"unknown loss_form {self.loss_form!r}; choose one of {LOSS_FORMS}")
        need(self.aggregation in AGGREGATIONS, f"unknown aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}")
        for field in ("delta_low", "delta_high", "seq_delta", "drpo_delta", "ratio_cap"):
            v = getattr(self, field)
            need(isinstance(v, (int, float)) and not math.isnan(v), f"{field} must be a number, got {v!r}")
            need(v > 0, f"{field} = {v!r} must be > 0 (use float('inf') to switch it off)")
        for field in ("relax_low_below", "relax_high_below"):
            v = getattr(self, field)
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
    def needs_topk(self) -> bool:
        """True if the loss needs ``topk_logp``, ``rollout_topk_logp`` and ``sampled_in_topk``."""
        return self.estimator.startswith("topk") or (self.seq_delta != INF and self.seq_estimator.startswith("topk"))

    @property
    def needs_old_logp(self) -> bool:
        """True if the loss needs the recomputed π_θ′ (an extra forward pass before the update)."""
        return self.anchor == "recompute"


def _m(name: str, **kw: object) -> Method:
    return Method(name=name, **kw)  # type: ignore[arg-type]


_GRPO_EPS = dict(estimator="ratio", delta_low=0.2, delta_high=0.28)  # DAPO clip-higher, §5.1 sanity test

PRESETS: dict[str, Method] = {
    # DPPO, §4; thresholds of the sanity test (§5.1, App. C): δ_TV = 0.15, δ_KL = 0.05, C = ∞.
    "dppo-binary-tv": _m("dppo-binary-tv", estimator="binary_tv", delta_low=0.15, delta_high=0.15),
    "dppo-binary-kl": _m("dppo-binary-kl", estimator="binary_kl", delta_low=0.05, delta_high=0.05),
    # Top-K ablation (§7.3, App. F.3): K = 20, δ_TV = 0.2, δ_KL = 0.05.
    "dppo-topk-tv": _m("dppo-topk-tv", estimator="topk_tv", delta_low=0.2, delta_high=0.2, topk=20),
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
    # GRPO-ClipHigher: ε_low = 0.2, ε_high = 0.28, C = ∞ (§5.1 sanity test; §7 uses ε_high = 0.27, C = 5).
    "grpo-clip-higher": _m("grpo-clip-higher", **_GRPO_EPS, loss_form="ppo_clip"),  # type: ignore[arg-type]
    # PG-IS: M = 1, C = ∞ (App. C.1, Eq. 23 table).
    "pg-is": _m("pg-is", estimator="none"),
    # CISPO = PG-TIS: M = 1, min(r, C) with C = 5 (§7 scaling runs; the §5.1 sanity test uses C = 3).
    "cispo": _m("cispo", estimator="none", ratio_cap=5.0),
    # MiniRL (Zheng et al. 2025): the clip-higher mask on the recomputed ratio π_θ/π_θ′, C = ∞ (§5.1, App. C.1).
    "minirl": _m("minirl", **_GRPO_EPS, anchor="recompute"),  # type: ignore[arg-type]
    # MiniRL-TIS: MiniRL with C = 3 (§5.4).
    "minirl-tis": _m("minirl-tis", **_GRPO_EPS, anchor="recompute", ratio_cap=3.0),  # type: ignore[arg-type]
    # §5.3, Fig. 5: PG-IS plus one mask, Â < 0 and μ − π > 0.5, anchored to μ.
    "minimal-negative-mask": _m("minimal-negative-mask", estimator="binary_tv", delta_low=0.5, delta_high=INF),
    # §6, Fig. 7: GRPO-ClipHigher with ε = ∞ for tokens whose μ(a_t) < α = 0.1 on the named side(s).
    "relax-low": _m("relax-low", **_GRPO_EPS, relax_low_below=0.1),  # type: ignore[arg-type]
    "relax-high": _m("relax-high", **_GRPO_EPS, relax_high_below=0.1),  # type: ignore[arg-type]
    "relax-both": _m("relax-both", **_GRPO_EPS, relax_low_below=0.1, relax_high_below=0.1),  # type: ignore[arg-type]
    # DRPO (arXiv 2606.09821; paper-notes §8): smooth Binary-TV penalty, no mask, no cap. δ = 0.15 is our choice so
    # the weight reaches 0 exactly on DPPO-Binary-TV's boundary; DRPO's own "12.5" is in another parameterisation.
    "drpo": _m("drpo", estimator="none", loss_form="drpo", drpo_delta=0.15),
    # TRM (arXiv 2512.23075): PG-IS with a sequence mask on the max token Binary-KL; δ = 0.05 mirrors DPPO-KL's δ
    # (TRM reports no single default for the sample-based detector).
    "trm": _m("trm", estimator="none", seq_estimator="binary_kl", seq_delta=0.05),
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
