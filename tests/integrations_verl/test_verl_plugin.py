"""dppo.integrations.verl against the real verl 0.9.1, in its own venv (.venv-verl, created by `make test` through
scripts/verl_venv.sh; verl pins transformers < 5.11 and brings ray). Skipped in the main venv, where verl is absent;
`make test` sets DPPO_REQUIRE_VERL=1 so that a broken verl venv fails instead of skipping.

The config object is verl's own: trainer/config/ppo_trainer.yaml composed by Hydra and turned into an FSDPActorConfig
by omega_conf_to_dataclass, as the actor does, with global_batch_info filled as verl's ppo_loss fills it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

if os.environ.get("DPPO_REQUIRE_VERL") == "1":
    import verl  # must be there: fail, don't skip
else:
    verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

import dppo  # noqa: E402
from dppo.integrations import verl as dverl  # noqa: E402
from dppo.methods import replace  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "verl_dppo.sh"
SERVED = [n for n in dppo.PRESETS if dverl.refusal(n) is None]
REFUSED = [n for n in dppo.PRESETS if dverl.refusal(n) is not None]
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
DEFAULT = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]  # verl's defaults otherwise
BASE = DEFAULT + list(dverl.BYPASS_OVERRIDES)  # bypass mode, shown to the loss
_BASE_CFG = []


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """[6, 7] tensors: a second thread only adds a scheduler wait per op on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trainer_config(**actor):
    """verl's ppo_trainer.yaml composed by Hydra once (+ BASE), copied, with ``actor.<key>`` set to Python values."""
    if not _BASE_CFG:
        _BASE_CFG.append(dverl.load_verl_config(BASE))
    cfg = _BASE_CFG[0].copy()
    for key, value in actor.items():
        OmegaConf.update(cfg, f"actor_rollout_ref.actor.{key}", value)
    return cfg


def actor_config(cfg=None, **actor):
    """verl's FSDPActorConfig from its own ppo_trainer.yaml (+ overrides), as the actor builds it."""
    cfg = cfg if cfg is not None else trainer_config(**actor)
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


@functools.lru_cache(maxsize=None)
def preset_actor_config(name):
    return actor_config(**preset_overrides(name))


def preset_overrides(name):
    """Actor settings that express the preset itself: its δ's and its cap."""
    m = dppo.get_method(name)
    out = {"policy_loss.loss_mode": f"dppo/{name}", "clip_ratio_c": m.ratio_cap}
    for side in ("low", "high"):
        d = getattr(m, f"delta_{side}")  # None: no token mask
        if d is not None and math.isfinite(d):
            out[f"clip_ratio_{side}"] = d
    return out


def verl_batch(seed=3, b=6, t=7):
    """verl-shaped float64 tensors: [B, T] right-padded response_mask (one empty row), old_log_prob = μ, log_prob a
    leaf, token advantages constant per sequence (GRPO) of both signs. Rows 0, 2, 4 have tokens where π is far from
    μ (every mask acts there, TRM drops those rows; in row 2, Â < 0, π fell 20-fold), rows 1, 5 only small moves."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None] < torch.tensor([7, 5, 4, 0, 6, 3])[:b, None]
    p_mu = torch.rand(b, t, generator=g, dtype=torch.float64) * 0.9 + 0.05
    far = torch.zeros(b, t, dtype=torch.bool)
    far[[0, 2, 4]] = torch.arange(t) % 2 == 0
    p_pi = torch.where(far, torch.rand(b, t, generator=g, dtype=torch.float64) * 0.98 + 0.01,
                       p_mu * torch.exp(0.05 * torch.randn(b, t, generator=g, dtype=torch.float64))).clamp(max=0.999)
    p_pi[2] = torch.where(far[2], p_mu[2] / 20, p_pi[2])  # Â < 0 and mean log(μ/π) > 0.5: the off-policy mask drops it
    adv = torch.tensor([1.0, -0.5, -1.2, 0.8, 0.6, -0.9], dtype=torch.float64)[:b, None].expand(b, t).clone()
    return p_mu.log(), p_pi.log().requires_grad_(), adv, mask


def call(loss_fn, cfg, mu, logp, adv, mask, mode, weights=None):
    logp.grad = None
    loss, metrics = loss_fn(old_log_prob=mu, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                            config=cfg, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), logp.grad.clone(), metrics


def matched(mode, mask, info):
    """verl's agg_loss modes as a dppo aggregation + denominator, worked out from agg_loss's docstring/formulas:
    token-mean Σℓ/(N/dp); token-sum Σℓ·dp; seq-mean-token-sum Σℓ/(G/dp); seq-mean-token-sum-norm Σℓ/(G/dp·L);
    seq-mean-token-mean Σ_b mean_b/(G/dp); N, G default to this batch's tokens / non-empty sequences, L to T."""
    dp = info.get("dp_size", 1)
    n = info.get("batch_num_tokens") or mask.sum().item()
    seqs = info.get("global_batch_size") or (mask.sum(-1) > 0).sum().item()
    return {"token-mean": ("token-mean", n / dp), "token-sum": ("sum", 1 / dp),
            "seq-mean-token-sum": ("sum", seqs / dp),
            "seq-mean-token-sum-norm": ("sum", seqs / dp * (info.get("loss_scale_factor") or mask.shape[-1])),
            "seq-mean-token-mean": ("seq-mean-token-mean", seqs / dp)}[mode]


def reference(name, cfg, mu, logp, adv, mask, mode, info):
    agg, den = matched(mode, mask, info)
    m = replace(dverl.method_for(name, cfg, warn=False), aggregation=agg)
    lp = logp.detach().clone().requires_grad_()
    loss, metrics = dppo.policy_loss(m, lp, mu, adv, mask, denominator=den)
    loss.backward()
    return loss.detach(), lp.grad, metrics


# ------------------------------------------------------------------------------------------------ registration
def test_import_verl_registers_dppo_losses_through_the_entry_point():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="verl.plugins")}
    assert eps.get("dppo") == "dppo.integrations.verl_plugin"
    fn = get_policy_loss_fn("dppo/dppo-binary-tv")
    assert fn.__module__ == "dppo.integrations.verl"
    assert {f"dppo/{n}" for n in dppo.PRESETS} <= set(core_algos.POLICY_LOSS_REGISTRY)
    assert get_policy_loss_fn("dppo_tv") is not fn  # verl's own stays


def test_plugin_import_failure_is_a_warning(monkeypatch):
    """verl loads entry points with a bare except and logs at DEBUG; dppo's entry point turns a failure into a
    warning that names it (here: dppo.methods made unimportable)."""
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "dppo.integrations.verl_plugin", raising=False)
    monkeypatch.delitem(sys.modules, "dppo.integrations.verl")
    monkeypatch.delattr(sys.modules["dppo.integrations"], "verl")
    monkeypatch.setitem(sys.modules, "dppo.methods", None)
    with pytest.warns(RuntimeWarning, match="dppo's verl plug-in failed to import.*ModuleNotFoundError.*dppo.methods"):
        importlib.import_module("dppo.integrations.verl_plugin")


# ------------------------------------------------------------------------------------------------ loss = policy_loss
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 11,
                                       "loss_scale_factor": 16}], ids=["local", "dp2-global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SERVED)
def test_registered_loss_equals_policy_loss(name, mode, info):
    cfg = preset_actor_config(name)  # the loss reads loss_agg_mode from its argument, as ppo_loss passes it
    cfg.global_batch_info.clear()
    cfg.global_batch_info.update(info)
    mu, logp, adv, mask = verl_batch()
    loss, grad, metrics = call(get_policy_loss_fn(f"dppo/{name}"), cfg, mu, logp, adv, mask, mode)
    ref_loss, ref_grad, ref_metrics = reference(name, cfg, mu, logp, adv, mask, mode, info)
    assert dverl.method_for(name, cfg, warn=False) == replace(name), "the overrides express the preset itself"
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)
    assert metrics["actor/dppo/masked_frac"] == pytest.approx(ref_metrics["masked_frac"])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["masked_frac"])
    m = dppo.get_method(name)  # the batch must exercise what the preset does
    assert ref_metrics["masked_frac"] > 0 or m.estimator == "none"
    assert ref_metrics["seq_masked_frac"] > 0 or not any(g.KIND in ("sequence", "offpolicy") for g in m.gates)
    assert ref_metrics["capped_frac"] > 0 or not math.isfinite(m.ratio_cap)


@pytest.mark.parametrize("name", SERVED)
def test_rollout_is_weights_scale_each_token(name):
    """Decoupled mode: verl's rollout_is_weights w multiply each token's loss. Truth by hand: each token's ℓ_t from a
    policy_loss call on that token alone (its row alone for TRM's sequence mask, with w constant per row), then
    Σ_t c_t·w_t·ℓ_t with verl's token-mean weight c_t = 1/N."""
    m = dppo.get_method(name)
    cfg = actor_config(**preset_overrides(name))
    mu, logp, adv, mask = verl_batch(seed=1)
    w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    if m.has_seq_gate:
        w = w[:, :1].expand_as(w).clone()
    with pytest.warns(UserWarning, match="decoupled mode"):
        loss, grad, _ = call(get_policy_loss_fn(f"dppo/{name}"), cfg, mu, logp, adv, mask, "token-mean", w)
    lp = logp.detach().clone().requires_grad_()
    total = 0.0
    unit = replace(dverl.method_for(name, cfg, warn=False), aggregation="sum")
    n = mask.sum()
    for b in range(mask.shape[0]):
        cols = [slice(None)] if m.has_seq_gate else [slice(t, t + 1) for t in range(mask.shape[1])]
        for c in cols:
            if not mask[b, c].any():
                continue
            row_loss, _ = dppo.policy_loss(unit, lp[b:b + 1, c], mu[b:b + 1, c], adv[b:b + 1, c], mask[b:b + 1, c])
            total = total + w[b, c].reshape(-1)[0] * row_loss / n  # w is constant over the slice
    total.backward()
    torch.testing.assert_close(loss, total.detach(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad, lp.grad, rtol=1e-8, atol=1e-12)


def test_same_gradient_as_verls_own_dppo_tv():
    """verl's dppo_tv (δ from clip_ratio_low/high, cap clip_ratio_c) and dppo/dppo-binary-tv with the same δ and cap
    give the same gradient: −Â·min(π/μ, C)·M·∇log π with the same mask (their loss values differ by construction)."""
    cfg = actor_config(clip_ratio_low=0.1, clip_ratio_high=0.2, clip_ratio_c=2.5)
    mu, logp, adv, mask = verl_batch(seed=2)
    _, g_verl, verl_metrics = call(get_policy_loss_fn("dppo_tv"), cfg, mu, logp, adv, mask, "token-mean")
    _, g_dppo, metrics = call(get_policy_loss_fn("dppo/dppo-binary-tv"), cfg, mu, logp, adv, mask, "token-mean")
    assert (torch.exp(logp) - torch.exp(mu)).abs().max() > 0.2 and (logp - mu).max() > math.log(2.5)
    torch.testing.assert_close(g_dppo, g_verl, rtol=1e-12, atol=1e-15)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(verl_metrics["actor/pg_clipfrac"])


# ------------------------------------------------------------------------------------------------ refusals, warnings
@pytest.mark.parametrize("name", REFUSED)
def test_presets_verl_cannot_feed_are_refused(name):
    m = dppo.get_method(name)
    why = "top-K" if m.needs_topk else "one old_log_prob"
    mu, logp, adv, mask = verl_batch()
    with pytest.raises(ValueError, match=why):
        call(get_policy_loss_fn(f"dppo/{name}"), actor_config(), mu, logp, adv, mask, "token-mean")
    with pytest.raises(ValueError, match=why):
        dverl.check_config(trainer_config(**{"policy_loss.loss_mode": f"dppo/{name}"}))


def test_topk_refusal_facts_still_hold_in_verl():
    """TOPK_MISSING states three facts of verl 0.9.1's source; fail here when verl changes them."""
    from verl.workers.utils import losses

    server = Path(verl.__file__).parent / "workers" / "rollout" / "vllm_rollout" / "vllm_async_server.py"  # needs vllm

    src = inspect.getsource(losses.ppo_loss)
    fields = re.search(r"fields = \[(.*?)\]", src).group(1)
    assert fields == '"response_mask", "old_log_probs", "advantages"', fields
    assert 'fields.append("rollout_is_weights")' in src and "topk" not in src.lower()
    assert 'sampling_params["logprobs"] = 0 if' in server.read_text()
    assert list(inspect.signature(core_algos.compute_policy_loss_vanilla).parameters) == list(
        inspect.signature(get_policy_loss_fn("dppo/cispo")).parameters)


def test_warnings_on_verl_defaults():
    """δ and C read from verl's fields as verl's own dppo_tv reads them (a cap of 3 can be chosen); null C is the
    preset's; verl's defaults in play are named."""
    mu, logp, adv, mask = verl_batch()
    fn = get_policy_loss_fn("dppo/dppo-binary-kl")
    with pytest.warns(UserWarning) as rec:
        call(fn, actor_config(**{"policy_loss.loss_mode": "dppo/dppo-binary-kl"}), mu, logp, adv, mask, "token-mean")
    text = " ".join(str(w.message) for w in rec)
    assert "clip_ratio_c = 3.0 (verl's default" in text and "own C is inf" in text and "clip_ratio_c=null" in text
    assert "clip_ratio_low/high are verl's PPO defaults" in text
    m = dverl.method_for("dppo-binary-kl", actor_config(), warn=False)
    assert (m.delta_low, m.delta_high, m.ratio_cap) == (0.2, 0.2, 3.0)  # verl's fields, as verl reads them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = actor_config(**preset_overrides("dppo-binary-kl"))
        call(fn, cfg, mu, logp, adv, mask, "token-mean")
        null = actor_config(clip_ratio_c=None, clip_ratio_low=0.05, clip_ratio_high=0.05)
        assert dverl.method_for("dppo-binary-kl", null).ratio_cap == math.inf  # null: the preset's own C
        capped = actor_config(clip_ratio_c=7.0, clip_ratio_low=0.05, clip_ratio_high=0.05)
        assert dverl.method_for("dppo-binary-kl", capped).ratio_cap == 7.0


def test_verls_default_config_is_refused_at_the_loss_with_the_fix():
    """verl's default rollout_correction (bypass_mode=false, rollout_is=null): old_log_prob is the recomputed π_old
    and nothing tells the loss. It raises naming the overrides; they, composed by Hydra with verl's config files,
    make it run (and the first call logs what it uses)."""
    mu, logp, adv, mask = verl_batch()
    fn = get_policy_loss_fn("dppo/dppo-binary-tv")
    default = dverl.load_verl_config(DEFAULT + ["actor_rollout_ref.actor.policy_loss.loss_mode=dppo/dppo-binary-tv"])
    with pytest.raises(ValueError, match="silently anchor to π_old.*" + re.escape(dverl.BYPASS_OVERRIDES[-1])):
        call(fn, omega_conf_to_dataclass(default.actor_rollout_ref.actor), mu, logp, adv, mask, "token-mean")
    with pytest.raises(ValueError, match="silently anchor to π_old"):
        dverl.check_config(default)
    fixed = dverl.load_verl_config(DEFAULT + list(dverl.BYPASS_OVERRIDES) + [
        "actor_rollout_ref.actor.policy_loss.loss_mode=dppo/dppo-binary-tv",
        "actor_rollout_ref.actor.clip_ratio_c=null",
        "actor_rollout_ref.actor.clip_ratio_low=0.15", "actor_rollout_ref.actor.clip_ratio_high=0.15"])
    OmegaConf.resolve(fixed)  # as verl's TaskRunner does before building the workers
    dverl._STATED.clear()  # a fresh process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dverl.check_config(fixed) == []
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dverl.logger.addHandler(handler)
    try:
        call(fn, omega_conf_to_dataclass(fixed.actor_rollout_ref.actor), mu, logp, adv, mask, "token-mean")
        call(fn, omega_conf_to_dataclass(fixed.actor_rollout_ref.actor), mu, logp, adv, mask, "token-mean")
    finally:
        dverl.logger.removeHandler(handler)
    assert len(records) == 1, records  # once per process
    line = records[0].getMessage()
    assert "the rollout's log-probs (bypass mode" in line
    assert "C = inf (the preset's: actor.clip_ratio_c is null)" in line
    # the actor's view of bypass mode contradicting algorithm's is refused before any worker starts
    lying = dverl.load_verl_config(DEFAULT + [
        "actor_rollout_ref.actor.policy_loss.loss_mode=dppo/dppo-binary-tv",
        "++actor_rollout_ref.actor.policy_loss.rollout_correction.bypass_mode=true"])
    with pytest.raises(ValueError, match="Link them"):
        dverl.check_config(lying)


def test_check_config_warns_about_decoupled_mode_and_the_legacy_trainer():
    """Hydra overrides, as on verl's command line (also what `python -m dppo.integrations.verl` takes)."""
    quiet = DEFAULT + ["actor_rollout_ref.actor.clip_ratio_c=5.0",
                       "actor_rollout_ref.actor.policy_loss.loss_mode=dppo/cispo"]
    with pytest.warns(UserWarning):
        off = dverl.check_config(dverl.load_verl_config(quiet + ["algorithm.rollout_correction.rollout_is=token"]))
    assert len(off) == 1 and "decoupled mode" in off[0]
    on = quiet + list(dverl.BYPASS_OVERRIDES)
    with pytest.warns(UserWarning):
        legacy = dverl.check_config(dverl.load_verl_config(on + ["trainer.use_v1=false"]))
    assert len(legacy) == 1 and "legacy trainer" in legacy[0]
    assert dverl.check_config(dverl.load_verl_config(on)) == []
    assert dverl.check_config(trainer_config()) == []  # not a dppo loss: nothing to say


def test_drift_verl_version_is_the_tested_one():
    assert verl.__version__ == dverl.TESTED_VERL, (
        f"verl {verl.__version__} installed, dppo.integrations.verl is tested with {dverl.TESTED_VERL}: rerun these "
        "tests, fix what fails, then update TESTED_VERL and scripts/verl_venv.sh")


# ------------------------------------------------------------------------------------------------ README
def test_readme_yaml_runs_as_written():
    """The README's YAML merged into verl's ppo_trainer.yaml: no dppo warning, and its loss is dppo-binary-tv with
    δ = 0.15, C = ∞ aggregated by verl's seq-mean-token-sum-norm over the global batch."""
    text = README.read_text()
    section = text[text.index("## Use dppo inside TRL / verl"):]
    yaml = re.search(r"```yaml\n(.*?)```", section[section.index("### verl"):], re.S).group(1)
    base = dverl.load_verl_config(DEFAULT)
    OmegaConf.set_struct(base, False)  # as Hydra merges a config file that lists ppo_trainer in its defaults
    cfg = OmegaConf.merge(base, OmegaConf.create(yaml))
    OmegaConf.set_struct(cfg, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dverl.check_config(cfg) == []
        actor = actor_config(cfg=cfg)
        info = {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 11, "loss_scale_factor": None}
        actor.global_batch_info.update(info)
        mu, logp, adv, mask = verl_batch()
        loss, grad, _ = call(get_policy_loss_fn(actor.policy_loss.loss_mode), actor, mu, logp, adv, mask,
                             actor.loss_agg_mode)
    m = replace("dppo-binary-tv", aggregation="sum")
    lp = logp.detach().clone().requires_grad_()
    ref, _ = dppo.policy_loss(m, lp, mu, adv, mask, denominator=11 / 2 * mask.shape[-1])
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad, lp.grad, rtol=1e-8, atol=1e-12)


def test_example_launch_script_composes_with_verls_config(tmp_path):
    """examples/verl_dppo.sh run with PYTHON = a stand-in that records its argv (no GPU, no Ray): its two commands
    (dppo's check, then verl's main_ppo) get the same overrides; composed by Hydra with verl's own config files they
    pass dppo's check_config and verl's own validate_config (main_ppo's driver-side check), and the loss built from
    that actor config runs with μ = the rollout's log-probs, δ = 0.15, C = ∞."""
    from verl.trainer.main_ppo import validate_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    log, shim = tmp_path / "argv", tmp_path / "python"
    shim.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "$ARGV_LOG"\n'
                    'printf "\\036\\0" >> "$ARGV_LOG"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "ARGV_LOG": str(log), "MODEL": "/models/tiny"}
    subprocess.run(["bash", str(EXAMPLE), "trainer.total_epochs=2"], env=env, check=True, timeout=60)
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\036\0")[:-1]]
    assert [c[:2] for c in calls] == [["-m", "dppo.integrations.verl"], ["-m", "verl.trainer.main_ppo"]]
    assert calls[0][2:] == calls[1][2:] and calls[1][-1] == "trainer.total_epochs=2"
    cfg = dverl.load_verl_config(calls[1][2:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert dverl.check_config(cfg) == []
    OmegaConf.resolve(cfg)  # as verl's TaskRunner does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # validate_config notes that GRPO needs no critic
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert cfg.actor_rollout_ref.model.path == "/models/tiny" and cfg.trainer.total_epochs == 2
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    m = dverl.method_for(actor.policy_loss.loss_mode[len("dppo/"):], actor, warn=False)
    assert (m.name, m.delta_low, m.delta_high, m.ratio_cap) == ("dppo-binary-tv", 0.15, 0.15, math.inf)
    mu, logp, adv, mask = verl_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        call(get_policy_loss_fn(actor.policy_loss.loss_mode), actor, mu, logp, adv, mask, actor.loss_agg_mode)
