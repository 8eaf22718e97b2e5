"""A policy-loss method is data: typed parts (:mod:`dppo.parts`) composed, plus the presets that name them.

Every method of the paper reduces to the unified gradient of Eq. 23 (App. C.1),

    ∇L(θ) = E_{y∼μ}[ Σ_t M_t · min(π_θ(y_t)/μ_θ′(y_t), C) · Â_t · ∇_θ log π_θ(y_t) ],

differing only in the mask M_t (which estimate, against which anchor, which thresholds) and the cap C; the field's
newer trust regions swap in other parts (a loss form, gates, a penalty). So a :class:`Method` is

    Method(name, anchor, mask=NoMask | RatioMask | DivergenceMask, cap=C, form=IS | PPOClip | DRPO | PG,
           gates=(BehaviorWeight | SequenceMask | OffPolicySequenceMask | GammaWeight, …), penalty=LogRatioPenalty,
           aggregation, max_len_norm, topk)

    e.g. Method("mine", mask=DivergenceMask("binary_kl", delta_low=0.05, delta_high=0.05), cap=5.0)

and a combination that makes no sense (a PPO-clip form on a divergence mask, a behaviour weight without the
recomputed π_θ′, …) is refused when it is built, with a message that names the parts.

Presets without a suffix carry the paper's §5.1 sanity-test values (App. C), ``-scaling`` presets the §7 scaling-run
values (App. E/F; C = 5 throughout); the follow-ups cite their sources. Customise one with a spec, the same syntax
``dppo train --method``, ``dppo compare`` and ``method.json`` use:

    method_from_spec("dppo-binary-tv@mask.delta_low=0.2,cap=5")       # dotted paths into the parts
    method_from_spec("vaco@gates.sequence.delta=0.3")                  # a gate by its kind
    method_from_spec("grpo@form=is")                                   # a part by its kind (its defaults)
    method_from_spec("cispo@ratio_cap=3")                              # the flat names of before issue 23 still work
    replace("dppo-binary-tv", delta_low=0.2, ratio_cap=5.0)            # the same, as keywords

or with :func:`dataclasses.replace` on the typed parts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from dppo.aggregation import AGGREGATIONS
from dppo.parts import (
    DRPO, FORMS, GATES, INF, IS, MASKS, PENALTIES, PG, BehaviorWeight, DivergenceMask, Form, GammaWeight, Gate,
    LogRatioPenalty, Mask, NoMask, OffPolicySequenceMask, PPOClip, RatioMask, SequenceMask, part_fields,
)

__all__ = ["Method", "PRESETS", "get_method", "replace", "method_from_spec", "parse_spec", "method_to_dict",
           "method_from_dict", "AGGREGATIONS", "ANCHORS"]

ANCHORS = ("rollout", "recompute")
Anchor = Literal["rollout", "recompute"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"]


@dataclass(frozen=True)
class Method:
    """One policy-loss method, composed of parts (:mod:`dppo.parts`). Defaults: DPPO-Binary-TV's sanity-test values
    (§5.1, App. C).

    Attributes:
        name: label used in logs.
        anchor: the policy the trust region is centred on. ``"rollout"`` = μ_θ′, the inference engine's log-probs at
            sampling time (the paper's choice for every method, §5.2, App. E); ``"recompute"`` = π_θ′, the trainer's
            recomputed log-probs before the update (MiniRL; the Fig. 4 "decoupled" ablation; IcePop, VACO). The IS
            weight min(π/μ, C) always uses the rollout μ (Eq. 23).
        mask: the token trust region M_t and the estimate it thresholds (NoMask, RatioMask, DivergenceMask).
        cap: C in min(r, C) (Eq. 23). ``inf`` = no truncation: the paper's DPPO sanity test; C = 5 in the scaling
            runs (§7). §5.4 finds truncation at C = 3 hurts. Forms without an IS weight (DRPO, PG) need ``inf``.
        form: how Â, the weights and log π make the token loss (IS, PPOClip, DRPO, PG).
        gates: detached weights on the token loss: per token (BehaviorWeight) or per sequence (SequenceMask,
            OffPolicySequenceMask, GammaWeight); at most one of each kind.
        penalty: a term added on every response token, masked or not (LogRatioPenalty), or None.
        aggregation: how token losses become one scalar (see :func:`dppo.aggregation.aggregate`).
        max_len_norm: the constant L of ``"seq-mean-token-sum-norm"`` (Dr.GRPO); None = the batch's T.
        topk: how many rollout top-K ids/log-probs the rollout must record (K = 20 in the paper, §4.4, the most vLLM
            returns); 0 for methods that need none.
    """

    name: str = "dppo-binary-tv"
    anchor: Anchor = "rollout"
    mask: Mask = DivergenceMask()
    cap: float = INF
    form: Form = IS()
    gates: tuple[Gate, ...] = ()
    penalty: LogRatioPenalty | None = None
    aggregation: Aggregation = "seq-mean-token-sum-norm"
    max_len_norm: int | None = None
    topk: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.gates, (list, tuple)):  # one order (dppo.parts.GATES'), so equal methods compare equal
            rank = {kind: i for i, kind in enumerate(GATES)}
            gates = sorted(self.gates, key=lambda g: rank.get(getattr(g, "KIND", None), -1))
            object.__setattr__(self, "gates", tuple(gates))

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"Method {self.name!r}: {msg}")

        def kinds(registry: dict) -> str:
            return ", ".join(c.__name__ for c in registry.values())

        need(isinstance(self.name, str) and bool(self.name), f"name must be a non-empty string, got {self.name!r}")
        need(self.anchor in ANCHORS, f"unknown anchor {self.anchor!r}; choose one of {ANCHORS}")
        need(isinstance(self.mask, tuple(MASKS.values())), f"mask must be one of {kinds(MASKS)}, got {self.mask!r}")
        need(isinstance(self.form, tuple(FORMS.values())), f"form must be one of {kinds(FORMS)}, got {self.form!r}")
        need(isinstance(self.gates, tuple) and all(isinstance(g, tuple(GATES.values())) for g in self.gates),
             f"gates must be a tuple of {kinds(GATES)}, got {self.gates!r}")
        seen = [g.KIND for g in self.gates]
        need(len(seen) == len(set(seen)), f"gates holds two gates of one kind ({seen}); combine them into one")
        need(self.penalty is None or isinstance(self.penalty, LogRatioPenalty),
             f"penalty must be None or a LogRatioPenalty, got {self.penalty!r}")
        cap = self.cap
        need(isinstance(cap, (int, float)) and not isinstance(cap, bool) and not math.isnan(cap),
             f"cap must be a number, got {cap!r}")
        need(cap > 0, f"cap = {cap!r} must be > 0 (use float('inf') to switch it off)")
        need(self.aggregation in AGGREGATIONS, f"unknown aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}")
        need(self.max_len_norm is None or (isinstance(self.max_len_norm, int) and not isinstance(self.max_len_norm, bool)
                                           and self.max_len_norm > 0),
             f"max_len_norm must be None or a positive int, got {self.max_len_norm!r}")
        need(isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 0,
             f"topk must be an int >= 0, got {self.topk!r}")
        # which parts go together
        form, mask = self.form, self.mask
        if isinstance(form, PPOClip):
            need(isinstance(mask, RatioMask), f"form PPOClip is the PPO min-form of a ratio mask, but the mask is "
                 f"{type(mask).__name__}; use mask=RatioMask(...) or form=IS()")
            need(not mask.relaxed, "form PPOClip has no relaxed form; use form=IS() for the §6 relax ablations")  # type: ignore[union-attr]
            need(mask.sides == "away", "form PPOClip is one-sided by construction; a RatioMask with sides='any' "  # type: ignore[union-attr]
                 "needs form=IS()")
        if isinstance(form, (DRPO, PG)):
            need(cap == INF, f"form {type(form).__name__} has no IS weight to cap; set cap=float('inf')")
        if not isinstance(mask, NoMask) and mask.sides == "any":
            need(isinstance(form, IS), "a mask with sides='any' masks by the estimate alone and needs form=IS() "
                 "(PPO's min-form is one-sided by construction)")
        if self.behavior is not None:
            need(self.anchor == "recompute", "a BehaviorWeight acts on b = π_θ′/μ, which is 1 with anchor='rollout'; "
                 "set anchor='recompute' or leave the gate out")
            need(isinstance(form, (IS, PPOClip)), "a BehaviorWeight weights an IS or PPOClip loss; "
                 f"{type(form).__name__} has no such weight")
        need(not (self.anchor == "recompute" and self.needs_topk),
             "a top-K estimator anchored to the recomputed policy would need π_θ′ at the top-K ids, which only the "
             "rollout records (as μ); use anchor='rollout' or a binary estimator")
        need(not self.needs_topk or self.topk >= 1,
             "a top-K estimator needs topk >= 1 (the number of rollout top-K log-probs to record; the paper uses 20)")

    # --- what the parts need, for the callers that gather the inputs ---
    @property
    def token_gates(self) -> tuple[Gate, ...]:
        return tuple(g for g in self.gates if not g.per_sequence)

    @property
    def sequence_gates(self) -> tuple[Gate, ...]:
        return tuple(g for g in self.gates if g.per_sequence)

    @property
    def behavior(self) -> BehaviorWeight | None:
        return next((g for g in self.gates if isinstance(g, BehaviorWeight)), None)

    @property
    def has_seq_gate(self) -> bool:
        return bool(self.sequence_gates)

    @property
    def needs_topk(self) -> bool:
        """True if the loss needs log π and log μ at the rollout's top-K ids and ``sampled_in_topk``."""
        return self.mask.needs_topk or any(g.needs_topk for g in self.sequence_gates)

    @property
    def needs_old_logp(self) -> bool:
        """True if the loss needs the recomputed π_θ′ (an extra forward pass before the update)."""
        return self.anchor == "recompute" or any(g.needs_old_logp for g in self.sequence_gates)

    @property
    def single_pass(self) -> bool:
        """True if every token's loss gradient is known from that token's own statistics and quantities fixed before
        the update, so :func:`dppo.policy_loss_from_hidden` can fuse it; False for a sequence gate on the current
        policy (TRM, VESPO, the off-policy sequence mask), whose value needs the whole sequence's log π_θ first."""
        return not any(g.reads_current for g in self.sequence_gates)

    # --- read-only views under the flat names of before issue 23 (logs, the trainer's checks) ---
    @property
    def estimator(self) -> str:
        """What the token mask thresholds: ``"none"``, ``"ratio"`` or the divergence estimator's name."""
        return self.mask.estimator if isinstance(self.mask, DivergenceMask) else self.mask.KIND

    @property
    def delta_low(self) -> float | None:
        """The negative side's threshold: δ of a divergence mask, ε of a ratio mask, None without a mask."""
        m = self.mask
        return m.delta_low if isinstance(m, DivergenceMask) else m.eps_low if isinstance(m, RatioMask) else None

    @property
    def delta_high(self) -> float | None:
        m = self.mask
        return m.delta_high if isinstance(m, DivergenceMask) else m.eps_high if isinstance(m, RatioMask) else None

    @property
    def ratio_cap(self) -> float:
        return self.cap

    @property
    def loss_form(self) -> str:
        return self.form.KIND

    def to_dict(self) -> dict[str, object]:
        """:func:`method_to_dict` (what ``method.json`` holds)."""
        return method_to_dict(self)


# ---------------------------------------------------------------------------------------------------------------
# Presets: one line of data each, with its source.
# ---------------------------------------------------------------------------------------------------------------
# GRPO-ClipHigher's ε (DAPO clip-higher): 0.2/0.28 in the §5.1 sanity test; 0.2/0.27 in the §7 scaling runs
# (following Zheng et al. 2025).
_CLIP_HIGHER = RatioMask(eps_low=0.2, eps_high=0.28)
_CLIP_HIGHER_SCALING = RatioMask(eps_low=0.2, eps_high=0.27)
# §7 / App. E: "C = 5" for DPPO, GRPO and CISPO in every scaling run.
_C_SCALING = 5.0


def _tv(d_low: float, d_high: float) -> DivergenceMask:
    return DivergenceMask("binary_tv", d_low, d_high)


def _kl(d: float) -> DivergenceMask:
    return DivergenceMask("binary_kl", d, d)


PRESETS: dict[str, Method] = {m.name: m for m in (
    # --- §5.1 sanity test (App. C): δ_TV = 0.15, δ_KL = 0.05, C = ∞ for DPPO; GRPO ε 0.2/0.28; CISPO C = 3. ---
    # DPPO, §4 (Eqs. 12–14), thresholds of §5.1.
    Method("dppo-binary-tv", mask=_tv(0.15, 0.15)),
    Method("dppo-binary-kl", mask=_kl(0.05)),
    # Top-K (Eqs. 15–16), K = 20 (§4.4). The sanity test has no Top-K run: δ_TV = 0.15 and δ_KL = 0.05 are *ours*,
    # §5.1's Binary thresholds carried over so that Binary and Top-K compare at equal δ; C = ∞ as §5.1's DPPO.
    Method("dppo-topk-tv", mask=DivergenceMask("topk_tv", 0.15, 0.15), topk=20),
    Method("dppo-topk-kl", mask=DivergenceMask("topk_kl", 0.05, 0.05), topk=20),
    # Fig. 4 "decoupled" ablation: the same masks anchored to the recomputed π_θ′ instead of μ_θ′ (§5.2).
    Method("dppo-binary-tv-recompute", anchor="recompute", mask=_tv(0.15, 0.15)),
    Method("dppo-binary-kl-recompute", anchor="recompute", mask=_kl(0.05)),
    # GRPO: PPO ratio mask, ε = 0.2 both sides (Shao et al. 2024), anchored to μ like every baseline (App. E).
    Method("grpo", mask=RatioMask(0.2, 0.2), form=PPOClip()),
    # GRPO-ClipHigher: ε_low = 0.2, ε_high = 0.28, C = ∞ (§5.1 sanity test).
    Method("grpo-clip-higher", mask=_CLIP_HIGHER, form=PPOClip()),
    # PG-IS: M = 1, C = ∞ (App. C.1, Eq. 23 table).
    Method("pg-is", mask=NoMask()),
    # CISPO = PG-TIS: M = 1, min(r, C) with C = 3 (§5.1 sanity test, App. C.1: "TIS variants use C = 3").
    Method("cispo", mask=NoMask(), cap=3.0),
    # MiniRL (Zheng et al. 2025): the clip-higher mask on the recomputed ratio π_θ/π_θ′, C = ∞ (§5.1, App. C.1).
    Method("minirl", anchor="recompute", mask=_CLIP_HIGHER),
    # MiniRL-TIS: MiniRL with C = 3 (§5.4).
    Method("minirl-tis", anchor="recompute", mask=_CLIP_HIGHER, cap=3.0),
    # §5.3, Fig. 5: PG-IS plus one mask, Â < 0 and μ − π > 0.5, anchored to μ.
    Method("minimal-negative-mask", mask=_tv(0.5, INF)),
    # §6, Fig. 7: GRPO-ClipHigher with ε = ∞ for tokens whose μ(a_t) < α = 0.1 on the named side(s).
    Method("relax-low", mask=dataclasses.replace(_CLIP_HIGHER, relax_low_below=0.1)),
    Method("relax-high", mask=dataclasses.replace(_CLIP_HIGHER, relax_high_below=0.1)),
    Method("relax-both", mask=dataclasses.replace(_CLIP_HIGHER, relax_low_below=0.1, relax_high_below=0.1)),
    # --- §7 scaling runs (App. E/F): δ_TV = 0.2, δ_KL = 0.05, GRPO ε 0.2/0.27, C = 5 for DPPO, GRPO and CISPO. ---
    # DPPO Binary (§7, App. E): δ_TV = 0.2, δ_KL = 0.05, C = 5.
    Method("dppo-binary-tv-scaling", mask=_tv(0.2, 0.2), cap=_C_SCALING),
    Method("dppo-binary-kl-scaling", mask=_kl(0.05), cap=_C_SCALING),
    # §7 "MoE Base w/ LoRA" (Table 1: rank 32, α 64, lr 1e-5): Binary-TV δ = 0.15 for LoRA (App. E), C = 5.
    Method("dppo-binary-tv-lora", mask=_tv(0.15, 0.15), cap=_C_SCALING),
    # Top-K ablation (§7.3, App. F.3): K = 20, δ_TV = 0.2, δ_KL = 0.05, C = 5.
    Method("dppo-topk-tv-scaling", mask=DivergenceMask("topk_tv", 0.2, 0.2), cap=_C_SCALING, topk=20),
    Method("dppo-topk-kl-scaling", mask=DivergenceMask("topk_kl", 0.05, 0.05), cap=_C_SCALING, topk=20),
    # GRPO-ClipHigher in the scaling runs (§7, App. E): ε_low = 0.2, ε_high = 0.27, C = 5.
    Method("grpo-clip-higher-scaling", mask=_CLIP_HIGHER_SCALING, form=PPOClip(), cap=_C_SCALING),
    # CISPO in the scaling runs (§7, App. E): C = 5.
    Method("cispo-scaling", mask=NoMask(), cap=_C_SCALING),
    # --- Follow-ups of the paper: DRPO (arXiv 2606.09821) and TRM (arXiv 2512.23075). ---
    # DRPO (arXiv 2606.09821): smooth Binary-TV penalty, no mask, no cap. δ = 0.15 is our choice so
    # the weight reaches 0 exactly on DPPO-Binary-TV's boundary; DRPO's own "12.5" is in another parameterisation.
    Method("drpo", mask=NoMask(), form=DRPO(delta=0.15)),
    # TRM (arXiv 2512.23075): PG-IS with a sequence mask on the max token Binary-KL; δ = 0.05 is *ours*, DPPO-KL's δ
    # (TRM reports no single default for the sample-based detector).
    Method("trm", mask=NoMask(), gates=(SequenceMask("binary_kl", delta=0.05),)),
    # --- The field's newer trust regions (issue 13). ---
    # IPO, prime-rl's default RL loss since PR #3418 (ipo_loss_fn; read at prime-rl 559b447, #2798): a token is
    # masked iff |π − μ| > eps whatever Â; kept tokens get −Â·r, r = π/μ uncapped; + kl_tau·(log r)² on every
    # response token; Σ over tokens / the batch's token count (token-mean). eps = 0.3, kl_tau = 0: PR #3586.
    Method("ipo", mask=DivergenceMask("binary_tv", 0.3, 0.3, sides="any"), aggregation="token-mean"),
    # IPO with the defaults of PR #2798 (kept by #3418 until #3586): ipo_threshold/eps = 0.1, kl_tau = 1e-3.
    Method("ipo-kl", mask=DivergenceMask("binary_tv", 0.1, 0.1, sides="any"), penalty=LogRatioPenalty(1e-3),
           aggregation="token-mean"),
    # IcePop (Ring-1T, arXiv 2510.18855; slime icepop_function): k = π_θ′/μ (recomputed old policy over rollout),
    # weight k if α ≤ k ≤ β else 0 (α = 0.5, β = 5), times PPO-clip on π/π_θ′ with ε = 0.2. Token-mean is *ours*
    # (the 1/Σ|y| of the IcePop objective as prime-rl's IcePop branch quotes it, commit 3c3248d).
    Method("icepop", anchor="recompute", mask=RatioMask(0.2, 0.2), form=PPOClip(),
           gates=(BehaviorWeight(low=0.5, high=5.0),), aggregation="token-mean"),
    # VACO (arXiv 2603.01365) as open-instruct implements it (compute_rho_correction at commit 5c2bf9a): the
    # sequence's mean Binary-TV |π_θ′ − μ| over its response; if it exceeds U, tokens with sign(log π_θ′ − log μ)·Â
    # > 0 are dropped; kept tokens weighted min(π_θ′/μ, 2) (rho_clamp_upper_bound); PPO-clip on π/π_θ′ with
    # ε = 0.2/0.272 (clip_lower/clip_higher); loss_denominator "token" = token-mean. U = 0.2 is *ours*: neither the
    # PR nor its scripts set rho_mask_upper_bound for VACO (default 0 = off), and the paper's own LLM rule could
    # not be confirmed (paper not read). Source: open-instruct PR #1755.
    Method("vaco", anchor="recompute", mask=RatioMask(0.2, 0.272), form=PPOClip(),
           gates=(BehaviorWeight(cap=2.0), SequenceMask("binary_tv", 0.2, reduce="mean", policy="old", sides="away")),
           aggregation="token-mean"),
    # --- The newest trust regions (issue 23). ---
    # KPop (prime-rl PR #3283 kpop_loss_fn at b9ba060; AReaL PR #1405's binary_kl filter): keep a token iff both
    # Bernoulli KLs D(π‖μ) and D(μ‖π) ≤ φ = 0.1 (the paper's, PR #3283's default), whatever Â; kept tokens −Â·r,
    # r = π/μ uncapped; token-mean as IPO. prime-rl's kl_tau·(log r)² (its default 1e-3) is off here, as in AReaL's
    # filter: turn it on with kpop@penalty.coef=1e-3 (*ours*: which of the two defaults the preset carries).
    Method("kpop", mask=DivergenceMask("binary_kl_max", 0.1, 0.1, sides="any"), aggregation="token-mean"),
    # VESPO (arXiv 2602.10693; trl#5199 get_gamma_weights): −sg(φ(w))·Â·log π, φ(w) = e^λ·w^k·e^(−λw) on the
    # sequence ratio w = Π π/μ, k₊ 2, λ₊ 3, k₋ 3, λ₋ 2 (TRL's and the official recipe's defaults), token-mean (both).
    Method("vespo", mask=NoMask(), form=PG(), gates=(GammaWeight(2.0, 3.0, 3.0, 2.0),), aggregation="token-mean"),
    # DeepSeek-V3.2 off-policy sequence mask (arXiv 2512.02556 Eq. 9; trl#4689 off_policy_mask_threshold): drop a
    # sequence with Â < 0 whose mean log(μ/π) > δ, on GRPO's PPO-clip (ε 0.2, TRL's default epsilon), token-mean
    # (TRL's default loss_type "dapo"). δ = 0.5 is *ours*: TRL's documented example value; neither source sets one.
    Method("offpolicy-seq-mask", mask=RatioMask(0.2, 0.2), form=PPOClip(), gates=(OffPolicySequenceMask(0.5),),
           aggregation="token-mean"),
    # DRO as verl#7245 defines it (compute_policy_loss_dro): −(log π·Â − ½β(log π − log μ)²), π_old = μ in bypass
    # mode; token-mean (verl's default loss_agg_mode). β = 0.05 is *ours* (verl requires it, sets no default; the
    # PR's usage example): κ = β/2.
    Method("dro", mask=NoMask(), form=PG(), penalty=LogRatioPenalty(0.05 / 2), aggregation="token-mean"),
)}


def get_method(method: Method | str) -> Method:
    """A Method as is, or the preset of that name (or a ``NAME@field=value,…`` spec, :func:`method_from_spec`); an
    unknown name lists the valid ones."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        if method in PRESETS:
            return PRESETS[method]
        if "@" in method:
            return method_from_spec(method)
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(PRESETS)}")
    raise TypeError(f"method must be a dppo.Method or a preset name, got {type(method).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Specs, overrides and method.json: one flat vocabulary of dotted paths.
#
#   name, anchor, cap, aggregation, max_len_norm, topk        the Method's own fields
#   mask, form, penalty                                       a part by its KIND (its defaults; penalty=none)
#   mask.<field>, form.<field>, penalty.<field>               a field of the current part
#   gates                                                     the gates' kinds ("sequence+behavior", "none")
#   gates.<kind>.<field>                                      a field of that gate (added with defaults if absent)
#
# plus the flat names of before issue 23 (ratio_cap, delta_low, estimator, seq_delta, kl_coef, …) as aliases.
# method.json is method_to_dict: every key above, in that order, readable back by method_from_dict.
# ---------------------------------------------------------------------------------------------------------------
_OWN = ("name", "anchor", "cap", "aggregation", "max_len_norm", "topk")
_PARTS = {"mask": MASKS, "form": FORMS, "penalty": PENALTIES}


def _defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _json(v: object) -> object:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def method_to_dict(m: Method) -> dict[str, object]:
    """Every field of ``m`` under the spec's dotted paths, JSON-safe (inf as "inf"): what ``method.json`` holds.
    :func:`method_from_dict` reads it back to an equal Method."""
    d: dict[str, object] = {"name": m.name, "anchor": m.anchor, "mask": m.mask.KIND}
    d.update({f"mask.{k}": v for k, v in part_fields(m.mask).items()})
    d["cap"] = m.cap
    d["form"] = m.form.KIND
    d.update({f"form.{k}": v for k, v in part_fields(m.form).items()})
    d["gates"] = [g.KIND for g in m.gates]
    for g in m.gates:
        d.update({f"gates.{g.KIND}.{k}": v for k, v in part_fields(g).items()})
    d["penalty"] = m.penalty.KIND if m.penalty is not None else "none"
    if m.penalty is not None:
        d.update({f"penalty.{k}": v for k, v in part_fields(m.penalty).items()})
    d.update(aggregation=m.aggregation, max_len_norm=m.max_len_norm, topk=m.topk)
    return {k: _json(v) for k, v in d.items()}


def _unknown(key: str, where: str) -> ValueError:
    return ValueError(f"unknown Method field {key!r}{where}; fields: {', '.join(_OWN)}, mask, mask.<field>, form, "
                      f"form.<field>, gates, gates.<kind>.<field> (kinds: {', '.join(GATES)}), penalty, "
                      f"penalty.<field>, or the flat names {', '.join(_LEGACY)}")


def _switch(d: dict, part: str, kind: object, where: str) -> None:
    """Make ``d``'s ``part`` a ``kind`` (with that kind's defaults), unless it is one already."""
    registry = _PARTS[part]
    allowed = tuple(registry) + (("none",) if part == "penalty" else ())
    if kind not in allowed:
        raise ValueError(f"unknown {part} {kind!r}{where}; choose one of {allowed}")
    if d.get(part) == kind:
        return
    for k in [k for k in d if k.startswith(part + ".")]:
        del d[k]
    d[part] = kind
    if kind != "none":
        d.update({f"{part}.{k}": v for k, v in _defaults(registry[kind]).items()})


def _set_gates(d: dict, kinds: object, where: str) -> None:
    if isinstance(kinds, str):
        kinds = [] if kinds in ("", "none") else kinds.split("+")
    bad = [k for k in kinds if k not in GATES]  # type: ignore[union-attr]
    if bad:
        raise ValueError(f"unknown gate kind(s) {bad}{where}; choose from {tuple(GATES)}")
    for k in d["gates"]:
        if k not in kinds:  # type: ignore[operator]
            for key in [x for x in d if x.startswith(f"gates.{k}.")]:
                del d[key]
    for k in kinds:  # type: ignore[union-attr]
        if k not in d["gates"]:
            d.update({f"gates.{k}.{f}": v for f, v in _defaults(GATES[k]).items()})
    d["gates"] = list(kinds)  # type: ignore[arg-type]


def _set(d: dict, key: str, value: object, where: str = "") -> None:
    """Apply one override to the flat form ``d`` of a method (module comment above for the keys)."""
    if key in _LEGACY:
        _LEGACY[key](d, value, where)
        return
    head, _, rest = key.partition(".")
    if key in _OWN:
        d[key] = value
    elif key in _PARTS:
        _switch(d, key, value, where)
    elif key == "gates":
        _set_gates(d, value, where)
    elif head in _PARTS and rest and "." not in rest:
        if head == "penalty" and d["penalty"] == "none":
            _switch(d, "penalty", "log_ratio", where)
        kind = d[head]
        if key not in d:
            names = ", ".join(_defaults(_PARTS[head][kind])) or "none"
            raise ValueError(f"{key!r}{where}: the {head} is {kind} (its fields: {names}); switch it first, e.g. "
                             f"{head}={'|'.join(k for k in _PARTS[head] if k != kind)}")
        d[key] = value
    elif head == "gates" and rest.count(".") == 1:
        kind, _, f = rest.partition(".")
        if kind not in GATES:
            raise ValueError(f"unknown gate kind {kind!r} in {key!r}{where}; choose one of {tuple(GATES)}")
        if f not in _defaults(GATES[kind]):
            raise ValueError(f"{key!r}{where}: gate {kind} has the fields {', '.join(_defaults(GATES[kind]))}")
        if kind not in d["gates"]:
            _set_gates(d, d["gates"] + [kind], where)
        d[key] = value
    else:
        raise _unknown(key, where)


def _threshold(side: str):
    def apply(d: dict, v: object, where: str) -> None:
        kind = d["mask"]
        if kind == "none":
            raise ValueError(f"delta_{side}{where}: {d['name']!r} has no token mask (mask = none), so no threshold to "
                             "set; thresholds belong to a ratio or divergence mask (e.g. estimator=binary_tv first)")
        _set(d, f"mask.{'eps' if kind == 'ratio' else 'delta'}_{side}", v, where)
    return apply


def _estimator(d: dict, v: object, where: str) -> None:
    """The flat ``estimator`` switches the mask's kind, keeping its thresholds and sides (as the flat Method did)."""
    old = {k[5:]: x for k, x in d.items() if k.startswith("mask.")}
    lo = old.get("delta_low", old.get("eps_low", 0.15))
    hi = old.get("delta_high", old.get("eps_high", 0.15))
    sides = old.get("sides", "away")
    if v == "none":
        _switch(d, "mask", "none", where)
    elif v == "ratio":
        _switch(d, "mask", "ratio", where)
        d.update({"mask.eps_low": lo, "mask.eps_high": hi, "mask.sides": sides})
    else:
        _switch(d, "mask", "divergence", where)
        d.update({"mask.estimator": v, "mask.delta_low": lo, "mask.delta_high": hi, "mask.sides": sides})


def _mask_field(f: str, neutral: object = None):
    def apply(d: dict, v: object, where: str) -> None:
        if v == neutral and f"mask.{f}" not in d:
            return  # the flat Method's "off" value on a mask without the field
        _set(d, f"mask.{f}", v, where)
    return apply


def _gate_field(kind: str, f: str, created: dict[str, object]):
    def apply(d: dict, v: object, where: str) -> None:
        if kind not in d["gates"]:
            _set_gates(d, d["gates"] + [kind], where)
            d.update({f"gates.{kind}.{k}": x for k, x in created.items()})  # the flat Method's "off" defaults
        d[f"gates.{kind}.{f}"] = v
    return apply


def _kl_coef(d: dict, v: object, where: str) -> None:
    if v == 0:
        _switch(d, "penalty", "none", where)
    else:
        _set(d, "penalty.coef", v, where)


def _drpo_delta(d: dict, v: object, where: str) -> None:
    if d["form"] != "drpo":
        raise ValueError(f"drpo_delta{where}: the form is {d['form']}, not drpo (set loss_form=drpo first)")
    d["form.delta"] = v


_SEQ_OFF = dict(estimator="binary_kl", delta=INF, reduce="max", policy="current", sides="all")
_BEHAVIOR_OFF = dict(low=0.0, high=INF, cap=INF)
# The flat Method's field names (before issue 23) and where each now lives.
_LEGACY = {
    "ratio_cap": lambda d, v, w: _set(d, "cap", v, w),
    "estimator": _estimator,
    "delta_low": _threshold("low"),
    "delta_high": _threshold("high"),
    "mask_sides": _mask_field("sides", "away"),
    "relax_low_below": _mask_field("relax_low_below", 0),
    "relax_high_below": _mask_field("relax_high_below", 0),
    "loss_form": lambda d, v, w: _set(d, "form", v, w),
    "drpo_delta": _drpo_delta,
    "kl_coef": _kl_coef,
    **{f"behavior_{f}": _gate_field("behavior", f, _BEHAVIOR_OFF) for f in ("low", "high", "cap")},
    **{f"seq_{f}": _gate_field("sequence", f, _SEQ_OFF) for f in ("estimator", "delta", "reduce", "policy", "sides")},
}


def _build(d: dict, where: str = "") -> Method:
    """The Method of a flat form; a gate switched off by its flat "off" values (sequence δ = inf, behaviour band and
    cap at 0/inf/inf) is dropped, as the flat Method treated them."""
    gates: list = []
    for kind in d["gates"]:
        kw = {f: d[f"gates.{kind}.{f}"] for f in _defaults(GATES[kind])}
        if (kind == "sequence" and kw["delta"] == INF) or (kind == "behavior" and kw == _BEHAVIOR_OFF):
            continue
        gates.append(GATES[kind](**kw))

    def part(p: str):
        kind = d[p]
        return None if kind == "none" and p == "penalty" else _PARTS[p][kind](
            **{f: d[f"{p}.{f}"] for f in _defaults(_PARTS[p][kind])})

    try:
        return Method(name=d["name"], anchor=d["anchor"], mask=part("mask"), cap=d["cap"], form=part("form"),
                      gates=tuple(gates), penalty=part("penalty"), aggregation=d["aggregation"],
                      max_len_norm=d["max_len_norm"], topk=d["topk"])
    except (ValueError, TypeError) as e:
        raise type(e)(f"{e}{where}") from None


def _num(key: str, v: object) -> object:
    """method.json's "inf" (JSON has no infinity) as the float it stands for."""
    return float(v) if key != "name" and isinstance(v, str) and v in ("inf", "-inf") else v


def _with(m: Method, changes: dict[str, object], where: str = "") -> Method:
    d = {k: _num(k, v) for k, v in method_to_dict(m).items()}
    for k, v in changes.items():
        _set(d, k, _num(k, v), where)
    return _build(d, where)


def replace(method: Method | str, **changes: object) -> Method:
    """``method`` (a Method or preset name) with ``changes``: dotted paths (``**{"mask.delta_low": 0.2}``) or the
    flat names of before issue 23 (``delta_low=0.2, ratio_cap=5.0``). An unknown field or a change that does not fit
    the method's parts is a ValueError that names it."""
    return _with(get_method(method), changes) if changes else get_method(method)


def _value(v: str) -> object:
    v = v.strip()
    try:
        return int(v) if v.lstrip("-").isdigit() else float(v)
    except ValueError:
        return v


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"NAME@key=value,key=value"`` → (NAME, {key: value}); values parsed as int, float (``inf`` included) or
    string. The one parser of method specs (``dppo train --method``, ``dppo compare --methods``)."""
    name, _, rest = spec.partition("@")
    over: dict[str, object] = {}
    for kv in filter(None, rest.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise ValueError(f"bad override {kv!r} in {spec!r}: expected field=value")
        over[k.strip()] = _value(v)
    return name.strip(), over


def method_from_spec(spec: str, **changes: object) -> Method:
    """A Method from ``"NAME"`` or ``"NAME@key=value,…"`` (``"cispo@ratio_cap=3"``, ``"kpop@penalty.coef=1e-3"``),
    then ``changes``; with overrides the name becomes the spec (logs say what was overridden). An unknown preset or
    field, or an override that does not fit the parts, is a ValueError that names it."""
    name, over = parse_spec(spec)
    if over:
        over = {"name": spec, **over}
    over.update(changes)
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(PRESETS)}")
    return _with(PRESETS[name], over, f" in {spec!r}") if over else PRESETS[name]


def method_from_dict(d: dict[str, object]) -> Method:
    """The Method a ``method.json`` records: :func:`method_to_dict`'s form (any subset of its keys, applied in order
    onto the default Method) or the flat form dppo wrote before issue 23 (``estimator``, ``delta_low``, …)."""
    d = {k: _num(k, v) for k, v in d.items()}
    if "mask" not in d and "estimator" in d:
        d = _from_flat(d)
    return _with(Method(), d, " in method.json")


def _from_flat(d: dict[str, object]) -> dict[str, object]:
    """The flat Method's fields (before issue 23) without those its parts do not have: thresholds of no mask,
    relaxations of a divergence mask, DRPO's δ on another form, gates at their "off" values."""
    est = d.get("estimator")
    drop = set()
    if est == "none":
        drop |= {"delta_low", "delta_high", "mask_sides"}
    if est != "ratio":
        drop |= {"relax_low_below", "relax_high_below"}
    if d.get("loss_form", "is") != "drpo":
        drop.add("drpo_delta")
    if d.get("seq_delta", INF) == INF:
        drop |= {k for k in d if k.startswith("seq_")}
    if all(d.get(f"behavior_{k}", v) == v for k, v in _BEHAVIOR_OFF.items()):
        drop |= {k for k in d if k.startswith("behavior_")}
    return {k: v for k, v in d.items() if k not in drop}
