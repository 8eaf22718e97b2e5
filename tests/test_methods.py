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
}


def test_exact_preset_names_and_public_imports():
    assert set(PRESETS) == EXPECTED
    assert dppo.Method is Method and dppo.policy_loss is policy_loss
    for name, m in PRESETS.items():
        assert m.name == name


def test_paper_values():
    """Each value against the paper section paper-notes cites."""
    P = PRESETS
    assert (P["dppo-binary-tv"].delta_low, P["dppo-binary-tv"].delta_high) == (0.15, 0.15)  # §5.1
    assert (P["dppo-binary-kl"].delta_low, P["dppo-binary-kl"].delta_high) == (0.05, 0.05)  # §5.1, §7
    assert P["dppo-topk-tv"].delta_low == 0.2 and P["dppo-topk-kl"].delta_low == 0.05  # F.3
    assert P["dppo-topk-tv"].topk == P["dppo-topk-kl"].topk == 20  # §4.4
    assert P["grpo-clip-higher"].delta_low == 0.2 and P["grpo-clip-higher"].delta_high == 0.28  # §5.1
    assert P["cispo"].ratio_cap == 5.0 and P["minirl-tis"].ratio_cap == 3.0  # §7 / §5.4
    assert all(P[n].ratio_cap == math.inf for n in ("dppo-binary-tv", "dppo-binary-kl", "pg-is", "minirl"))
    assert P["minirl"].anchor == "recompute" and P["dppo-binary-kl-recompute"].anchor == "recompute"
    assert all(m.anchor == "rollout" for n, m in P.items() if "recompute" not in n and not n.startswith("minirl"))
    assert P["minimal-negative-mask"].delta_low == 0.5 and P["minimal-negative-mask"].delta_high == math.inf  # §5.3
    assert P["relax-low"].relax_low_below == 0.1 and P["relax-low"].relax_high_below == 0.0  # §6
    assert P["relax-both"].relax_low_below == P["relax-both"].relax_high_below == 0.1


def test_presets_cite_their_source_in_the_module():
    src = inspect.getsource(dppo.methods)
    for name in EXPECTED:
        # the comment block right above each preset names a section, figure, table, equation or arXiv id
        pos = src.index(f'"{name}":')
        above = src[max(0, src.rfind("\n    #", 0, pos) - 400):pos]
        assert re.search(r"§|Fig\.|Table|Eq\.|App\.|arXiv", above), name


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
    ],
)
def test_impossible_methods_fail_with_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        Method(name="custom", **kw)
