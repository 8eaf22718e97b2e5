"""dppo.methods: the preset table, customisation, and impossible configurations with actionable messages."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pytest

import dppo
from dppo import PRESETS, Method, get_method, policy_loss
from dppo.methods import replace

EXPECTED = {
    "dppo-binary-tv", "dppo-binary-kl", "dppo-topk-tv", "dppo-topk-kl", "dppo-binary-tv-recompute",
    "dppo-binary-kl-recompute", "grpo", "grpo-clip-higher", "pg-is", "cispo", "minirl", "minirl-tis",
    "minimal-negative-mask", "relax-low", "relax-high", "relax-both", "drpo", "trm",
    "dppo-binary-tv-scaling", "dppo-binary-kl-scaling", "dppo-binary-tv-lora", "dppo-topk-tv-scaling",
    "dppo-topk-kl-scaling", "grpo-clip-higher-scaling", "cispo-scaling", "ipo", "ipo-kl", "icepop", "vaco",
}


def test_exact_preset_names_and_public_imports():
    assert set(PRESETS) == EXPECTED
    assert dppo.Method is Method and dppo.policy_loss is policy_loss
    for name, m in PRESETS.items():
        assert m.name == name


def test_paper_values():
    """Each value against the paper section paper-notes cites. Un-suffixed presets: the §5.1 sanity test."""
    P = PRESETS
    assert (P["dppo-binary-tv"].delta_low, P["dppo-binary-tv"].delta_high) == (0.15, 0.15)  # §5.1
    assert (P["dppo-binary-kl"].delta_low, P["dppo-binary-kl"].delta_high) == (0.05, 0.05)  # §5.1, §7
    # no Top-K run in §5.1: §5.1's Binary thresholds (ours), so Binary and Top-K compare at equal δ
    assert P["dppo-topk-tv"].delta_low == P["dppo-topk-tv"].delta_high == 0.15
    assert P["dppo-topk-kl"].delta_low == P["dppo-topk-kl"].delta_high == 0.05
    assert P["dppo-topk-tv"].topk == P["dppo-topk-kl"].topk == 20  # §4.4
    assert P["grpo-clip-higher"].delta_low == 0.2 and P["grpo-clip-higher"].delta_high == 0.28  # §5.1
    assert P["cispo"].ratio_cap == 3.0 and P["minirl-tis"].ratio_cap == 3.0  # §5.1 ("TIS variants use C = 3") / §5.4
    assert all(P[n].ratio_cap == math.inf for n in ("dppo-binary-tv", "dppo-binary-kl", "dppo-topk-tv",
                                                     "dppo-topk-kl", "grpo-clip-higher", "pg-is", "minirl"))
    assert P["minirl"].anchor == "recompute" and P["dppo-binary-kl-recompute"].anchor == "recompute"
    assert all(m.anchor == "rollout" for n, m in P.items()
               if "recompute" not in n and not n.startswith("minirl") and n not in ("icepop", "vaco"))
    assert P["minimal-negative-mask"].delta_low == 0.5 and P["minimal-negative-mask"].delta_high == math.inf  # §5.3
    assert P["relax-low"].relax_low_below == 0.1 and P["relax-low"].relax_high_below == 0.0  # §6
    assert P["relax-both"].relax_low_below == P["relax-both"].relax_high_below == 0.1


def test_scaling_values():
    """§7 / App. E/F: δ_TV 0.2 (0.15 LoRA), δ_KL 0.05, Top-K 0.2 / 0.05 with K = 20, GRPO 0.2/0.27, C = 5 throughout;
    each -scaling preset differs from its sanity-test twin only in those fields."""
    P = PRESETS
    want = {"dppo-binary-tv-scaling": (0.2, 0.2), "dppo-binary-kl-scaling": (0.05, 0.05),
            "dppo-binary-tv-lora": (0.15, 0.15), "dppo-topk-tv-scaling": (0.2, 0.2),
            "dppo-topk-kl-scaling": (0.05, 0.05), "grpo-clip-higher-scaling": (0.2, 0.27)}
    for name, (lo, hi) in want.items():
        assert (P[name].delta_low, P[name].delta_high, P[name].ratio_cap) == (lo, hi, 5.0), name
    assert P["cispo-scaling"].ratio_cap == 5.0
    for name in list(want) + ["cispo-scaling"]:
        twin = name.replace("-scaling", "").replace("-lora", "")
        changed = {f.name for f in dataclasses.fields(Method)
                   if getattr(P[name], f.name) != getattr(P[twin], f.name)}
        assert changed <= {"name", "delta_low", "delta_high", "ratio_cap"}, (name, changed)
    assert P["dppo-topk-tv-scaling"].topk == 20


def test_new_preset_fields():
    """IPO (prime-rl #2798/#3418/#3586), IcePop (arXiv 2510.18855), VACO (open-instruct #1755) as data."""
    P = PRESETS
    ipo, ipo_kl, ice, vaco = P["ipo"], P["ipo-kl"], P["icepop"], P["vaco"]
    assert (ipo.delta_low, ipo.delta_high, ipo.kl_coef, ipo.mask_sides) == (0.3, 0.3, 0.0, "any")  # #3586
    assert (ipo_kl.delta_low, ipo_kl.kl_coef) == (0.1, 1e-3)  # #2798
    assert ipo.ratio_cap == math.inf and ipo.aggregation == "token-mean" and ipo.anchor == "rollout"
    assert (ice.behavior_low, ice.behavior_high, ice.delta_low, ice.delta_high) == (0.5, 5.0, 0.2, 0.2)
    assert ice.loss_form == "ppo_clip" and ice.needs_old_logp and ice.single_pass
    assert (vaco.delta_low, vaco.delta_high, vaco.behavior_cap, vaco.seq_delta) == (0.2, 0.272, 2.0, 0.2)
    assert (vaco.seq_reduce, vaco.seq_policy, vaco.seq_sides) == ("mean", "old", "away") and vaco.single_pass
    assert not P["trm"].single_pass and all(m.single_pass for n, m in P.items() if n != "trm")


def test_presets_cite_their_source_in_the_module():
    src = inspect.getsource(dppo.methods)
    for name in EXPECTED:
        # the comment block right above each preset names a section, figure, table, equation, arXiv id or peer PR
        pos = src.index(f'"{name}":')
        above = src[max(0, src.rfind("\n    #", 0, pos) - 400):pos]
        assert re.search(r"§|Fig\.|Table|Eq\.|App\.|arXiv|PR #\d+", above), name


def test_replace_customises_and_is_frozen():
    m = dataclasses.replace(PRESETS["dppo-binary-tv"], delta_low=0.2, ratio_cap=5.0)
    assert m.delta_low == 0.2 and m.ratio_cap == 5.0 and PRESETS["dppo-binary-tv"].delta_low == 0.15
    assert replace("grpo", delta_high=0.3).delta_high == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.delta_low = 0.3  # type: ignore[misc]
    assert get_method("pg-is") is PRESETS["pg-is"]
    with pytest.raises(TypeError, match="Method or a preset name"):
        get_method(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(delta_low=0.0), r"delta_low = 0.0 must be > 0 \(use float\('inf'\)"),
        (dict(delta_high=-1.0), "delta_high"),
        (dict(ratio_cap=0.0), "ratio_cap = 0.0 must be > 0"),
        (dict(delta_low=float("nan")), "delta_low must be a number"),
        (dict(estimator="binary_js"), "unknown estimator 'binary_js'; choose one of"),
        (dict(anchor="old"), "unknown anchor"),
        (dict(aggregation="mean"), "unknown aggregation"),
        (dict(loss_form="ppo_clip"), "set estimator='ratio'"),
        (dict(estimator="topk_tv"), "top-K estimator needs topk >= 1"),
        (dict(estimator="topk_tv", topk=20, anchor="recompute"), "anchor='rollout' or a binary estimator"),
        (dict(relax_low_below=0.1), "only apply to the ratio mask"),
        (dict(estimator="ratio", relax_low_below=1.5), r"relax_low_below = 1.5 must be a probability"),
        (dict(loss_form="drpo", ratio_cap=5.0), "set ratio_cap=float\\('inf'\\)"),
        (dict(max_len_norm=0), "max_len_norm"),
        (dict(topk=-1), "topk must be an int >= 0"),
        (dict(seq_estimator="none", seq_delta=0.1), "seq_estimator"),
        (dict(mask_sides="both"), "unknown mask_sides 'both'"),
        (dict(mask_sides="any", estimator="none"), "mask_sides='any' masks by the estimate alone"),
        (dict(mask_sides="any", estimator="ratio", loss_form="ppo_clip"), "needs loss_form='is'"),
        (dict(kl_coef=-1e-3), "kl_coef = -0.001 must be a finite number >= 0"),
        (dict(kl_coef=float("inf")), "kl_coef"),
        (dict(behavior_low=0.5), "set anchor='recompute'"),
        (dict(anchor="recompute", behavior_low=2.0, behavior_high=1.0), "must be < behavior_high"),
        (dict(anchor="recompute", behavior_cap=0.0), "behavior_cap = 0.0 must be > 0"),
        (dict(anchor="recompute", behavior_cap=2.0, estimator="none", loss_form="drpo"), "DRPO's penalty has no"),
        (dict(seq_reduce="median", seq_delta=0.1), "unknown seq_reduce"),
        (dict(seq_policy="old", seq_estimator="topk_tv", seq_delta=0.1, topk=20), "binary or ratio seq_estimator"),
        (dict(seq_sides="some"), "unknown seq_sides"),
    ],
)
def test_impossible_methods_fail_with_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        Method(name="custom", **kw)
