"""dppo.methods: the preset table, composing and customising methods from parts, method.json, and impossible
combinations refused with actionable messages."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from pathlib import Path

import pytest

import dppo
from dppo import PRESETS, Method, get_method, policy_loss
from dppo.methods import method_from_dict, method_from_spec, method_to_dict, parse_spec, replace
from dppo.parts import (
    DRPO, IS, PG, BehaviorWeight, DivergenceMask, GammaWeight, LogRatioPenalty, NoMask, OffPolicySequenceMask,
    PPOClip, RatioMask, SequenceMask,
)

BEFORE = json.loads((Path(__file__).parent / "data" / "methods_before_issue23.json").read_text())
NEW = {"kpop", "vespo", "offpolicy-seq-mask", "dro"}  # issue 23
EXPECTED = set(BEFORE) | NEW
INF = math.inf


def test_exact_preset_names_and_public_imports():
    assert set(PRESETS) == EXPECTED and len(BEFORE) == 29
    assert dppo.Method is Method and dppo.policy_loss is policy_loss and dppo.DivergenceMask is DivergenceMask
    for name, m in PRESETS.items():
        assert m.name == name


def test_presets_before_issue_23_read_back_from_their_flat_method_json():
    """Each preset as the flat Method of before issue 23 wrote it to method.json (tests/data, generated from that
    commit's PRESETS) reads back to today's typed preset: the field-by-field mapping flat → parts."""
    for name, flat in BEFORE.items():
        assert method_from_dict(flat) == PRESETS[name], name


def test_paper_values():
    """Each value against the paper section paper-notes cites. Un-suffixed presets: the §5.1 sanity test."""
    P = PRESETS
    assert P["dppo-binary-tv"].mask == DivergenceMask("binary_tv", 0.15, 0.15)  # §5.1
    assert P["dppo-binary-kl"].mask == DivergenceMask("binary_kl", 0.05, 0.05)  # §5.1, §7
    # no Top-K run in §5.1: §5.1's Binary thresholds (ours), so Binary and Top-K compare at equal δ
    assert P["dppo-topk-tv"].mask == DivergenceMask("topk_tv", 0.15, 0.15)
    assert P["dppo-topk-kl"].mask == DivergenceMask("topk_kl", 0.05, 0.05)
    assert P["dppo-topk-tv"].topk == P["dppo-topk-kl"].topk == 20  # §4.4
    assert P["grpo-clip-higher"].mask == RatioMask(0.2, 0.28) and isinstance(P["grpo-clip-higher"].form, PPOClip)
    assert P["cispo"].cap == 3.0 and P["minirl-tis"].cap == 3.0  # §5.1 ("TIS variants use C = 3") / §5.4
    assert all(P[n].cap == INF for n in ("dppo-binary-tv", "dppo-binary-kl", "dppo-topk-tv", "dppo-topk-kl",
                                         "grpo-clip-higher", "pg-is", "minirl"))
    assert P["minirl"].anchor == "recompute" and P["dppo-binary-kl-recompute"].anchor == "recompute"
    assert all(m.anchor == "rollout" for n, m in P.items()
               if "recompute" not in n and not n.startswith("minirl") and n not in ("icepop", "vaco"))
    assert P["minimal-negative-mask"].mask == DivergenceMask("binary_tv", 0.5, INF)  # §5.3
    assert P["relax-low"].mask == RatioMask(0.2, 0.28, relax_low_below=0.1)  # §6
    assert P["relax-both"].mask == RatioMask(0.2, 0.28, relax_low_below=0.1, relax_high_below=0.1)
    assert all(isinstance(P[n].form, IS) for n in ("relax-low", "relax-high", "relax-both", "minirl"))
    assert all(isinstance(P[n].mask, NoMask) for n in ("pg-is", "cispo", "cispo-scaling", "drpo", "trm"))


def test_scaling_values():
    """§7 / App. E/F: δ_TV 0.2 (0.15 LoRA), δ_KL 0.05, Top-K 0.2 / 0.05 with K = 20, GRPO 0.2/0.27, C = 5 throughout;
    each -scaling preset differs from its sanity-test twin only in the thresholds and the cap."""
    P = PRESETS
    want = {"dppo-binary-tv-scaling": (0.2, 0.2), "dppo-binary-kl-scaling": (0.05, 0.05),
            "dppo-binary-tv-lora": (0.15, 0.15), "dppo-topk-tv-scaling": (0.2, 0.2),
            "dppo-topk-kl-scaling": (0.05, 0.05), "grpo-clip-higher-scaling": (0.2, 0.27)}
    for name, (lo, hi) in want.items():
        assert (P[name].delta_low, P[name].delta_high, P[name].cap) == (lo, hi, 5.0), name
    assert P["cispo-scaling"].cap == 5.0
    for name in list(want) + ["cispo-scaling"]:
        twin = P[name.replace("-scaling", "").replace("-lora", "")]
        changed = {f.name for f in dataclasses.fields(Method) if getattr(P[name], f.name) != getattr(twin, f.name)}
        assert changed <= {"name", "mask", "cap"}, (name, changed)
        assert type(P[name].mask) is type(twin.mask) and P[name].estimator == twin.estimator
    assert P["dppo-topk-tv-scaling"].topk == 20


def test_preset_parts():
    """IPO (prime-rl #2798/#3418/#3586), IcePop (arXiv 2510.18855), VACO (open-instruct #1755) and the four of
    issue 23 as parts."""
    P = PRESETS
    assert P["ipo"].mask == DivergenceMask("binary_tv", 0.3, 0.3, sides="any") and P["ipo"].penalty is None  # #3586
    assert P["ipo-kl"].mask.delta_low == 0.1 and P["ipo-kl"].penalty == LogRatioPenalty(1e-3)  # #2798
    assert P["ipo"].cap == INF and P["ipo"].aggregation == "token-mean" and P["ipo"].anchor == "rollout"
    ice, vaco = P["icepop"], P["vaco"]
    assert ice.gates == (BehaviorWeight(0.5, 5.0),) and ice.mask == RatioMask(0.2, 0.2)
    assert isinstance(ice.form, PPOClip) and ice.needs_old_logp and ice.single_pass
    assert vaco.mask == RatioMask(0.2, 0.272) and vaco.behavior == BehaviorWeight(cap=2.0)
    assert SequenceMask("binary_tv", 0.2, "mean", "old", "away") in vaco.gates and vaco.single_pass
    assert P["kpop"].mask == DivergenceMask("binary_kl_max", 0.1, 0.1, sides="any") and P["kpop"].penalty is None
    assert P["vespo"].gates == (GammaWeight(2.0, 3.0, 3.0, 2.0),) and isinstance(P["vespo"].form, PG)
    assert P["offpolicy-seq-mask"].gates == (OffPolicySequenceMask(0.5),)
    assert isinstance(P["offpolicy-seq-mask"].form, PPOClip) and P["offpolicy-seq-mask"].mask == RatioMask(0.2, 0.2)
    assert P["dro"].penalty == LogRatioPenalty(0.025) and isinstance(P["dro"].form, PG) and P["dro"].cap == INF
    assert all(P[n].aggregation == "token-mean" for n in NEW)
    two_pass = {"trm", "vespo", "offpolicy-seq-mask"}  # a sequence statistic of the current policy
    assert {n for n, m in P.items() if not m.single_pass} == two_pass


def _comment_above(name: str) -> str:
    """The comment lines right above a preset's line in dppo/methods.py."""
    lines = inspect.getsource(dppo.methods).splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(f'Method("{name}"'))
    j = i
    while lines[j - 1].strip().startswith("#"):
        j -= 1
    return "\n".join(lines[j:i])


def test_presets_cite_their_source_in_the_module():
    for name in EXPECTED:
        # a section, figure, table, equation, arXiv id or peer PR, in the comment block right above each preset (or
        # the block above a run of presets that share it)
        above = _comment_above(name)
        k = name
        while not above:  # a preset sharing the comment of the preset above it
            k = list(PRESETS)[list(PRESETS).index(k) - 1]
            above = _comment_above(k)
        assert re.search(r"§|Fig\.|Table|Eq\.|App\.|arXiv|PR #\d+|#\d{4}", above), name


def test_ours_is_stated_where_a_value_was_chosen():
    for name in ("kpop", "offpolicy-seq-mask", "dro", "drpo", "trm", "vaco", "dppo-topk-tv"):
        assert "*ours*" in _comment_above(name) or "our choice" in _comment_above(name), name


# ---------------------------------------------------------------------------------------------------------------
# Composing and customising.
def test_compose_from_parts_and_frozen():
    m = Method("mine", mask=DivergenceMask("binary_kl", 0.05, 0.05), cap=5.0)
    assert m == replace("dppo-binary-kl-scaling", name="mine")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.cap = 3.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.mask.delta_low = 0.3  # type: ignore[misc]
    m2 = dataclasses.replace(m, mask=dataclasses.replace(m.mask, delta_low=0.2))
    assert m2.delta_low == 0.2 and m.delta_low == 0.05
    assert get_method("pg-is") is PRESETS["pg-is"]
    with pytest.raises(TypeError, match="Method or a preset name"):
        get_method(3)  # type: ignore[arg-type]
    assert Method(gates=[BehaviorWeight(cap=2.0)], anchor="recompute").gates == (BehaviorWeight(cap=2.0),)


def test_overrides_dotted_paths_kinds_and_flat_aliases():
    tv = PRESETS["dppo-binary-tv"]
    assert method_from_spec("dppo-binary-tv@mask.delta_low=0.2").mask == DivergenceMask("binary_tv", 0.2, 0.15)
    assert method_from_spec("dppo-binary-tv@mask.delta_low=0.2").name == "dppo-binary-tv@mask.delta_low=0.2"
    assert replace(tv, delta_low=0.2) == replace(tv, **{"mask.delta_low": 0.2})  # flat alias = dotted path
    assert replace("grpo", delta_high=0.3).mask == RatioMask(0.2, 0.3)  # on a ratio mask the flat δ is ε
    assert replace("cispo", ratio_cap=5.0) == replace("cispo", cap=5.0) == dataclasses.replace(PRESETS["cispo"], cap=5.0)
    assert isinstance(replace("grpo", form="is").form, IS) and isinstance(replace("grpo", loss_form="is").form, IS)
    # the flat estimator switches the mask's kind, keeping thresholds (the flat Method's meaning)
    assert replace("dppo-binary-tv", estimator="ratio").mask == RatioMask(0.15, 0.15)
    assert replace("grpo", estimator="binary_kl", loss_form="is").mask == DivergenceMask("binary_kl", 0.2, 0.2)
    assert isinstance(replace("dppo-binary-tv", estimator="none").mask, NoMask)
    # gates: by kind, added with their defaults, dropped at their flat "off" values
    assert replace("pg-is", seq_delta=0.05, name="trm") == PRESETS["trm"]
    assert replace("trm", seq_delta=INF).gates == ()
    assert replace("trm", **{"gates.sequence.delta": 0.1}).gates == (SequenceMask(delta=0.1),)
    assert replace("vaco", **{"gates.sequence.delta": 0.3}).gates[1].delta == 0.3
    assert replace("vaco", gates="sequence").gates == (SequenceMask("binary_tv", 0.2, "mean", "old", "away"),)
    assert replace("minirl", behavior_cap=2.0).behavior == BehaviorWeight(cap=2.0)
    assert replace("pg-is", **{"gates.offpolicy.delta": 0.3}).gates == (OffPolicySequenceMask(0.3),)
    # penalty: the flat kl_coef, or penalty.coef (which adds one), or penalty=none
    assert replace("ipo", kl_coef=1e-3, name="ipo-kl", delta_low=0.1, delta_high=0.1) == PRESETS["ipo-kl"]
    assert replace("kpop", **{"penalty.coef": 1e-3}).penalty == LogRatioPenalty(1e-3)  # prime-rl's default
    assert replace("ipo-kl", kl_coef=0).penalty is None and replace("dro", penalty="none").penalty is None
    assert replace("drpo", drpo_delta=0.2).form == DRPO(0.2)
    assert get_method("cispo@ratio_cap=4").cap == 4  # get_method (and policy_loss) take specs too


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown method 'nope'; choose one of"),
    ("grpo@no_such_field=1", "unknown Method field 'no_such_field'"),
    ("grpo@mask.delta_low=0.1", r"the mask is ratio \(its fields: eps_low, eps_high, relax_low_below"),
    ("cispo@delta_low=0.2", "has no token mask"),
    ("grpo@mask=triangle", "unknown mask 'triangle'"),
    ("grpo@gates.tent.delta=1", "unknown gate kind 'tent'"),
    ("grpo@gates.sequence.cap=1", "gate sequence has the fields estimator, delta"),
    ("pg-is@drpo_delta=0.2", "the form is is, not drpo"),
    ("grpo@mask.eps_low", "expected field=value"),
    ("dppo-binary-tv@form=ppo_clip", "form PPOClip is the PPO min-form of a ratio mask"),
    ("dppo-binary-tv@estimator=binary_js", r"unknown estimator 'binary_js'"),
    ("dppo-binary-tv@mask.delta_low=0", r"delta_low = 0 must be > 0 \(use float\('inf'\)"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        method_from_spec(spec)


def test_parse_spec_is_the_one_parser():
    from dppo.report import compare

    assert parse_spec("cispo@ratio_cap=3,mask.sides=any, cap=inf") == ("cispo", {"ratio_cap": 3, "mask.sides": "any",
                                                                                 "cap": INF})
    assert compare.parse_method_spec("kpop@penalty.coef=1e-3") == ("kpop", {"penalty.coef": 1e-3})
    assert "parse_spec" in inspect.getsource(compare.parse_method_spec)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_method_json_every_field_and_readable_back(name):
    """method_to_dict holds every field of every part (strict JSON: inf as "inf"), and reads back equal; each key
    is also a valid override."""
    m = PRESETS[name]
    d = method_to_dict(m)
    text = json.dumps(d, allow_nan=False)
    assert method_from_dict(json.loads(text)) == m
    parts = [m.mask, m.form, *m.gates] + ([m.penalty] if m.penalty else [])
    n_fields = 6 + 4 + sum(len(dataclasses.fields(p)) for p in parts)  # own fields + mask/form/gates/penalty kinds
    assert len(d) == n_fields
    for key, value in d.items():
        if key not in ("name", "gates"):
            assert replace(m, **{key: json.loads(json.dumps(value))}) == m, key


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DivergenceMask(delta_low=0.0), r"delta_low = 0.0 must be > 0 \(use float\('inf'\)"),
        (lambda: DivergenceMask(delta_high=-1.0), "delta_high"),
        (lambda: Method(cap=0.0), "cap = 0.0 must be > 0"),
        (lambda: DivergenceMask(delta_low=float("nan")), "delta_low must be a number"),
        (lambda: DivergenceMask("binary_js"), "unknown estimator 'binary_js'; choose one of"),
        (lambda: Method(anchor="old"), "unknown anchor"),
        (lambda: Method(aggregation="mean"), "unknown aggregation"),
        (lambda: Method(form=PPOClip()), "form PPOClip is the PPO min-form of a ratio mask"),
        (lambda: Method(mask=DivergenceMask("topk_tv")), "top-K estimator needs topk >= 1"),
        (lambda: Method(mask=DivergenceMask("topk_tv"), topk=20, anchor="recompute"),
         "anchor='rollout' or a binary estimator"),
        (lambda: RatioMask(relax_low_below=1.5), r"relax_low_below = 1.5 must be a probability"),
        (lambda: Method(mask=NoMask(), form=DRPO(), cap=5.0), r"DRPO has no IS weight to cap; set cap=float\('inf'\)"),
        (lambda: Method(mask=NoMask(), form=PG(), cap=5.0), "PG has no IS weight to cap"),
        (lambda: Method(max_len_norm=0), "max_len_norm"),
        (lambda: Method(topk=-1), "topk must be an int >= 0"),
        (lambda: SequenceMask("none"), "unknown estimator 'none'"),
        (lambda: DivergenceMask(sides="both"), "unknown sides 'both'"),
        (lambda: Method(mask=RatioMask(sides="any"), form=PPOClip()), "one-sided by construction"),
        (lambda: Method(mask=DivergenceMask(sides="any"), form=DRPO()), "sides='any' .* needs form=IS"),
        (lambda: Method(mask=RatioMask(relax_low_below=0.1), form=PPOClip()), "no relaxed form"),
        (lambda: LogRatioPenalty(-1e-3), "coef = -0.001 must be > 0"),
        (lambda: LogRatioPenalty(float("inf")), "coef = inf must be finite"),
        (lambda: Method(gates=(BehaviorWeight(low=0.5),)), "set anchor='recompute'"),
        (lambda: BehaviorWeight(low=2.0, high=1.0), "must be < high"),
        (lambda: BehaviorWeight(cap=0.0), "cap = 0.0 must be > 0"),
        (lambda: BehaviorWeight(), "weigh every token by 1"),
        (lambda: Method(anchor="recompute", mask=NoMask(), form=DRPO(), gates=(BehaviorWeight(cap=2.0),)),
         "DRPO has no such weight"),
        (lambda: SequenceMask(reduce="median"), "unknown reduce"),
        (lambda: SequenceMask("topk_tv", policy="old"), "binary or ratio estimator"),
        (lambda: SequenceMask(sides="some"), "unknown sides"),
        (lambda: SequenceMask(delta=INF), "delta = inf must be finite"),
        (lambda: Method(gates=(SequenceMask(), SequenceMask(delta=0.1))), "two gates of one kind"),
        (lambda: Method(gates=(NoMask(),)), "gates must be a tuple of BehaviorWeight"),
        (lambda: Method(mask=IS()), "mask must be one of NoMask, RatioMask, DivergenceMask"),
        (lambda: OffPolicySequenceMask(-0.1), "delta = -0.1 must be a finite number >= 0"),
        (lambda: GammaWeight(lambda_pos=0.0), "lambda_pos = 0.0 must be > 0"),
        (lambda: GammaWeight(k_neg=-1.0), "k_neg = -1.0 must be a finite number >= 0"),
    ],
)
def test_impossible_methods_fail_with_what_to_change(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_flat_names_refuse_what_the_flat_method_refused():
    """The flat overrides users typed before issue 23 still reach the same refusals."""
    for spec, match in [("dppo-binary-tv@relax_low_below=0.1", "the mask is divergence"),
                        ("dppo-binary-tv@loss_form=drpo,ratio_cap=5", "DRPO has no IS weight to cap"),
                        ("dppo-binary-tv@behavior_low=0.5", "set anchor='recompute'"),
                        ("pg-is@mask_sides=any", "has no|the mask is none"),
                        ("dppo-binary-tv@kl_coef=-1", "coef = -1 must be > 0")]:
        with pytest.raises(ValueError, match=match):
            method_from_spec(spec)


def test_docs_methods_example_runs_and_lists_every_preset():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    env: dict = {}
    exec(re.search(r"```python\n(.*?)```", doc, re.S).group(1), env)
    assert env["mine"].cap == 5.0 and env["m"] == replace("dppo-binary-tv", delta_low=0.2, ratio_cap=5.0)
    for name in PRESETS:
        assert f"`{name}`" in doc, name
