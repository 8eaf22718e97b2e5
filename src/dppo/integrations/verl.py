"""dppo's presets in verl's policy-loss registry: ``actor.policy_loss.loss_mode=dppo/<preset>`` (verl 0.9.1, tested).

Loaded by ``import verl`` through the ``verl.plugins`` entry point of the dppo package (``VERL_USE_EXTERNAL_PLUGINS``
left at "auto"; :mod:`dppo.integrations.verl_plugin` turns an import failure into a warning). Each loss is
:func:`dppo.policy_loss` on verl's tensors:

    μ        = old_log_prob           the rollout log-probs when ``algorithm.rollout_correction.bypass_mode=True``
                                      (verl then sets old_log_probs = rollout_log_probs); the recomputed π_old otherwise
    δ_low/high = actor.clip_ratio_low/high   for every side the preset's token mask thresholds (its finite δ's or ε's)
    C        = actor.clip_ratio_c as verl reads it (its own dppo_tv/dppo_kl cap there); null: the preset's cap
               (∞ for DPPO, 5 for CISPO, …; verl's schema has no "unset", its default is 3.0). Not read for a
               form without an IS weight (drpo, vespo, dro)
    loss     = agg_loss(ℓ, response_mask, actor.loss_agg_mode, **config.global_batch_info)   verl's own aggregation

**μ checked at the loss.** A registered loss sees the actor config and the tensors, not ``algorithm``; in verl's
default config (``bypass_mode=false``, ``rollout_is: null``) it receives the recomputed π_old as ``old_log_prob`` and
nothing that says so. So the loss requires bypass mode to be visible where it looks: ``actor.policy_loss.
rollout_correction`` (a field of verl's PolicyLossConfig, which verl's legacy trainer fills the same way), linked with
``++actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}``. Without it and without
``rollout_is_weights`` the loss raises with the overrides that fix it (:data:`MU_UNCONFIRMED`); with
``rollout_is_weights`` (decoupled mode configured on purpose: ``rollout_is`` set) it warns and weights each token by
them. The first call in each process logs what it uses (μ's source, δ, C and where each came from).

verl's ``agg_loss`` is linear in its loss matrix, agg_loss(ℓ) = Σ_t c_t ℓ_t with c = ∂agg_loss/∂ℓ (which carries
verl's global-batch / data-parallel normalisation), so the loss is ``policy_loss(..., token_weights=c·w)``: dppo's
per-token losses aggregated with verl's weights, w = verl's ``rollout_is_weights`` when given
(tests/integrations_verl checks this against policy_loss for every preset).

Refused (the loss raises, naming why): Top-K presets, because nothing carries the rollout's top-K to a registered loss
in verl 0.9.1 (``TOPK_MISSING``), and presets anchored to the recomputed π_old, because a registered loss sees one
``old_log_prob`` (μ in bypass mode, π_old otherwise), never both.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch

try:
    import verl
    from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
except ImportError as e:  # pragma: no cover
    raise ImportError("dppo.integrations.verl needs verl (tested: 0.9.1) in the environment") from e

import dppo
from dppo.methods import PRESETS, Method, get_method, replace
from dppo.parts import IS, NoMask, PPOClip

__all__ = ["register", "check_config", "method_for", "refusal", "load_verl_config", "TESTED_VERL", "TOPK_MISSING",
           "MU_UNCONFIRMED", "BYPASS_OVERRIDES"]

logger = logging.getLogger(__name__)

TESTED_VERL = "0.9.1"
VERL_CLIP_RATIO_C = 3.0  # ppo_trainer.yaml actor.clip_ratio_c: dual-clip PPO's constant, used as the IS cap by dppo_tv
VERL_CLIP_RATIO = 0.2  # ppo_trainer.yaml actor.clip_ratio / clip_ratio_low / clip_ratio_high

TOPK_MISSING = (
    "verl 0.9.1 cannot feed a Top-K loss: (1) its rollout asks the engine for the sampled token's log-prob only "
    "(vllm_async_server: sampling_params['logprobs'] = 0), so μ's top-K ids and log-probs are never recorded; "
    "(2) ppo_loss (verl/workers/utils/losses.py) passes a registered loss only old_log_probs, advantages, "
    "response_mask and rollout_is_weights, dropping any other batch field; (3) the actor engine returns log_probs and "
    "entropy of the sampled tokens only, so log π at the rollout's top-K ids cannot be computed in the loss. (verl's "
    "top-K distillation path carries a fixed teacher's top-K to distillation losses, not the rollout's to a policy "
    "loss.) Use dppo-binary-tv / dppo-binary-kl, or dppo.integrations.trl / dppo's own trainer for Top-K"
)
# The Hydra overrides that make μ the rollout's and visible to the loss (quote the last one in a shell: it holds ${})
BYPASS_OVERRIDES = ("algorithm.rollout_correction.bypass_mode=true",
                    "actor_rollout_ref.rollout.calculate_log_probs=true",
                    "++actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}")
MU_UNCONFIRMED = (
    "μ is not known to be the rollout's: this loss received no rollout_is_weights and the actor config does not show "
    "bypass mode (actor.policy_loss.rollout_correction.bypass_mode is not true). In verl's default config "
    "(algorithm.rollout_correction.bypass_mode=false) old_log_prob is the recomputed π_old, so the trust region and "
    "IS weight would silently anchor to π_old instead of the rollout μ (the paper anchors to μ, §5.2). Set "
    + " ".join(BYPASS_OVERRIDES) + " (and trainer.use_v1=true); the last one shows bypass mode to the loss")
RECOMPUTE_MISSING = (
    "a preset anchored to the recomputed π_old needs both μ (IS weight) and π_old (anchor), but verl gives a "
    "registered loss one old_log_prob: μ with rollout_correction.bypass_mode=True, the recomputed π_old otherwise. "
    "With bypass_mode=False the μ-anchored preset (e.g. dppo/dppo-binary-tv) already anchors to π_old"
)


def refusal(method: Method | str) -> str | None:
    """Why verl cannot serve this method, or None."""
    m = get_method(method)
    if m.needs_topk:
        return TOPK_MISSING
    if m.needs_old_logp:
        return RECOMPUTE_MISSING
    return None


def _warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)


def _raw(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def _get(config: Any, key: str, default: Any) -> Any:
    v = _raw(config, key, default)
    return default if v is None else v


def _reads_cap(m: Method) -> bool:
    """Whether the method's form has an IS weight min(π/μ, C) for ``clip_ratio_c`` to cap (DRPO and PG have none)."""
    return isinstance(m.form, (IS, PPOClip))


def method_for(preset: Method | str, config: Any, *, warn: bool = True) -> Method:
    """The preset with δ from ``clip_ratio_low/high`` (the sides its token mask thresholds) and the cap C from
    ``clip_ratio_c`` (verl's field, read as verl's own dppo_tv reads it), or the preset's own C where
    ``clip_ratio_c`` is null or the form has no IS weight. Warns where verl's defaults would mislead."""
    m = get_method(preset)
    sym = _get(config, "clip_ratio", VERL_CLIP_RATIO)
    low, high = _get(config, "clip_ratio_low", sym), _get(config, "clip_ratio_high", sym)
    over: dict[str, float] = {}
    if not isinstance(m.mask, NoMask):  # a thresholded mask: divergence (δ) or ratio (ε)
        if math.isfinite(m.delta_low):  # type: ignore[arg-type]
            over["delta_low"] = float(low)
        if math.isfinite(m.delta_high):  # type: ignore[arg-type]
            over["delta_high"] = float(high)
        if warn and low == high == VERL_CLIP_RATIO and (m.delta_low, m.delta_high) != (low, high):
            _warn(f"dppo/{m.name}: actor.clip_ratio_low/high are verl's PPO defaults ({VERL_CLIP_RATIO}) and are "
                  f"read as δ; the preset's own are {m.delta_low}/{m.delta_high}. Set them explicitly.")
    cap = _raw(config, "clip_ratio_c", VERL_CLIP_RATIO_C)
    if cap is not None and _reads_cap(m):
        over["ratio_cap"] = float(cap)
        if warn and float(cap) == VERL_CLIP_RATIO_C and m.ratio_cap != VERL_CLIP_RATIO_C:
            _warn(f"dppo/{m.name}: actor.clip_ratio_c = 3.0 (verl's default, dual-clip PPO's constant) is used as the "
                  f"IS cap C, as verl's own dppo_tv/dppo_kl use it; the preset's own C is {m.ratio_cap} and the paper "
                  "finds C = 3 hurts (§5.4). Set actor_rollout_ref.actor.clip_ratio_c=null for the preset's C (or "
                  "any other value to cap there).")
    return replace(m, **over)


def _bypass_shown(config: Any) -> bool:
    """Whether the actor config shows bypass mode (``policy_loss.rollout_correction.bypass_mode``)."""
    rc = _raw(_raw(config, "policy_loss"), "rollout_correction")
    return bool(_raw(rc, "bypass_mode", False))


_STATED: set[tuple[str, str]] = set()  # (loss, μ's source) already logged in this process


def _state_once(name: str, m: Method, config: Any, mu: str) -> None:
    """Log, once per process, loss and source of μ, what the loss uses and where each value came from."""
    if (name, mu) in _STATED:
        return
    _STATED.add((name, mu))
    cap = _raw(config, "clip_ratio_c", VERL_CLIP_RATIO_C)
    source = ("the preset's: actor.clip_ratio_c is null)" if cap is None else "from actor.clip_ratio_c)"
              if _reads_cap(m) else f"the {m.form.KIND} form has no IS weight: actor.clip_ratio_c is not read)")
    logger.warning(f"{name}: μ = old_log_prob, {mu}; δ_low/high = {m.delta_low}/{m.delta_high} (from "
                   f"actor.clip_ratio_low/high where the preset thresholds a side); C = {m.ratio_cap} ("
                   + source + "; aggregation: verl's agg_loss, actor.loss_agg_mode")


def _agg_weights(mask: torch.Tensor, mode: str, info: dict, dtype: torch.dtype) -> torch.Tensor:
    """c = ∂ agg_loss(X, mask, mode, **info) / ∂X: verl's per-token aggregation weights (agg_loss is linear in X)."""
    x = torch.zeros(mask.shape, dtype=torch.promote_types(dtype, torch.float32), device=mask.device, requires_grad=True)
    with torch.enable_grad():
        (c,) = torch.autograd.grad(agg_loss(loss_mat=x, loss_mask=mask, loss_agg_mode=mode, **info), x)
    return c


def _make_loss(name: str, method: Method):
    why = refusal(method)

    def loss_fn(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        if why is not None:
            raise ValueError(f"{name}: {why}")
        if config is None:
            raise ValueError(f"{name} needs verl's actor config (clip_ratio_*, global_batch_info)")
        if rollout_is_weights is None and not _bypass_shown(config):
            raise ValueError(f"{name}: {MU_UNCONFIRMED}")
        m = method_for(method, config)
        mask = response_mask.bool()
        weights = _agg_weights(mask, loss_agg_mode, dict(_get(config, "global_batch_info", {})), log_prob.dtype)
        if rollout_is_weights is not None:
            _warn(f"{name}: verl passed rollout_is_weights, i.e. decoupled mode "
                  "(algorithm.rollout_correction.bypass_mode=false, rollout_is set): old_log_prob is the recomputed "
                  "π_old, not the rollout μ, so the trust region and IS weight are anchored to π_old (× verl's "
                  "π_old/μ weights). The paper anchors to μ (§5.2): set " + " ".join(BYPASS_OVERRIDES))
            _state_once(name, m, config, "the recomputed π_old (decoupled mode: rollout_is_weights given)")
            weights = weights * rollout_is_weights.detach().to(weights.dtype)
        else:
            _state_once(name, m, config, "the rollout's log-probs (bypass mode, shown in "
                                         "actor.policy_loss.rollout_correction)")
        loss, metrics = dppo.policy_loss(m, log_prob, old_log_prob, advantages, mask, token_weights=weights)
        n = mask.sum().clamp(min=1)
        out: dict[str, Any] = {f"actor/dppo/{k}": v for k, v in metrics.items() if k != "loss"}
        out["actor/pg_clipfrac"] = metrics["masked_frac"]
        out["actor/ppo_kl"] = (((old_log_prob - log_prob.detach()) * mask).sum() / n).item()
        return loss, out

    loss_fn.__name__ = loss_fn.__qualname__ = f"dppo_{method.name.replace('-', '_')}"
    loss_fn.__doc__ = f"verl policy loss {name}: dppo.policy_loss({method.name!r}, ...) (dppo.integrations.verl)."
    return loss_fn


def register(name: str, method: Method | str) -> None:
    """Register ``method`` (a preset name or a :class:`dppo.Method`, e.g. ``dppo.methods.replace(...)``) in verl's
    registry as ``name`` (use it as ``actor.policy_loss.loss_mode``)."""
    register_policy_loss(name)(_make_loss(name, get_method(method)))


for _name in PRESETS:
    register(f"dppo/{_name}", _name)

if verl.__version__ != TESTED_VERL:
    _warn(f"dppo.integrations.verl was tested with verl {TESTED_VERL}, found {verl.__version__}: run "
          "tests/integrations_verl against it")


def check_config(cfg: Any) -> list[str]:
    """Checks a full verl trainer config (the Hydra ``DictConfig`` of ``main_ppo``) whose actor uses a ``dppo/*``
    loss, in the driver, before any worker starts: raises where the loss would raise (a preset verl cannot serve, μ
    not shown to be the rollout's) or where the actor's view of bypass mode contradicts ``algorithm``'s; returns (and
    emits) the warnings. Call it in your launcher, or run ``python -m dppo.integrations.verl <hydra overrides>``."""
    actor = cfg.actor_rollout_ref.actor
    mode = actor.policy_loss.loss_mode
    if not str(mode).startswith("dppo/"):
        return []
    preset = mode[len("dppo/"):]
    why = refusal(preset) if preset in PRESETS else None
    if why:
        raise ValueError(f"{mode}: {why}")
    out: list[str] = []
    rc = cfg.algorithm.get("rollout_correction", None)
    bypass = bool(rc and rc.get("bypass_mode", False))
    decoupled_is = bool(rc and rc.get("rollout_is", None)) and not bypass
    shown = _bypass_shown(actor)
    if shown and not bypass:
        raise ValueError(f"{mode}: actor.policy_loss.rollout_correction.bypass_mode is true but "
                         "algorithm.rollout_correction.bypass_mode is not, so old_log_prob is the recomputed π_old "
                         "while the loss would take it for μ. Link them: " + BYPASS_OVERRIDES[-1])
    if not shown and not decoupled_is:
        raise ValueError(f"{mode}: {MU_UNCONFIRMED}")
    if decoupled_is:
        out.append(f"{mode}: decoupled mode (bypass_mode=false, rollout_is={rc.get('rollout_is')!r}): old_log_prob is "
                   "the recomputed π_old, not the rollout log-prob μ, so the trust region is anchored to π_old and "
                   "verl's π_old/μ weights multiply each token's loss (the paper anchors to μ, §5.2). Set "
                   + " ".join(BYPASS_OVERRIDES))
    elif not cfg.trainer.get("use_v1", True):
        out.append(f"{mode}: the legacy trainer (trainer.use_v1=False) replaces policy_loss.loss_mode with "
                   "'bypass_mode' when bypass_mode=True (apply_bypass_mode), so verl's PPO-clip loss would run "
                   "instead of dppo's. Set trainer.use_v1=True.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if preset in PRESETS:
            method_for(preset, actor)
    out += [str(w.message) for w in caught]
    for msg in out:
        _warn(msg)
    return out


def load_verl_config(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """verl's own ``trainer/config/ppo_trainer.yaml`` composed by Hydra with ``overrides``, as ``main_ppo`` does."""
    import os

    from hydra import compose, initialize_config_dir

    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


if __name__ == "__main__":  # python -m dppo.integrations.verl actor_rollout_ref.actor.policy_loss.loss_mode=dppo/...
    import sys

    # the Hydra overrides of a main_ppo command line; its flags (--cfg job, -m, --config-name=...) are not overrides
    overrides = [a for a in sys.argv[1:] if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    msgs = check_config(load_verl_config(overrides))
    print("\n".join(msgs) if msgs else "no warnings")
