"""Every preset's loss, metrics and gradients are bit for bit what they were before the Method was rebuilt from typed
parts (issue 23): replays tests/data/loss_golden.pt.gz (tests/golden_loss.py says what it covers and how it was made)."""

from __future__ import annotations

import math

import pytest
import torch

from golden_loss import PRESETS_BEFORE, fused_call, load, platform, policy_call, unpack

_DATA = load()
# Bit-identity is a property of one platform: elsewhere libm/SLEEF may round exp/log differently in the last place.
SAME_PLATFORM = _DATA["platform"] == platform()


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if SAME_PLATFORM:
        assert torch.equal(got, want), f"{what}: max |Δ| = {(got.double() - want.double()).abs().max().item():.3g}"
    else:
        tol = dict(rtol=1e-12, atol=1e-14) if want.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got, want, **tol, msg=what)


def _same_metrics(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), f"{what}: metric names or order changed"
    for k in want:
        if SAME_PLATFORM:
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), f"{what}: {k} {got[k]!r} != {want[k]!r}"
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), f"{what}: {k}"


def test_record_covers_every_preset_before_issue_23():
    assert {c["preset"] for c in _DATA["policy"]} == set(PRESETS_BEFORE) == {c["preset"] for c in _DATA["fused"]}
    if not SAME_PLATFORM:
        print(f"golden recorded on {_DATA['platform']}, replayed on {platform()}: compared to rounding, not bits")


@pytest.mark.parametrize("name", PRESETS_BEFORE)
def test_policy_loss_bit_identical(name):
    for case in (c for c in _DATA["policy"] if c["preset"] == name):
        what = f"{name} inputs {case['inputs']} {case['variant']}"
        loss, met, grad = policy_call(name, case["variant"], _DATA["policy_inputs"][case["inputs"]])
        _same(loss, unpack(case["loss"]), what + " loss")
        _same(grad, unpack(case["grad"]), what + " ∂/∂log π")
        _same_metrics(met, case["metrics"], what)


@pytest.mark.parametrize("name", PRESETS_BEFORE)
def test_fused_bit_identical(name):
    for case in (c for c in _DATA["fused"] if c["preset"] == name):
        what = f"{name} fused inputs {case['inputs']} denominator={case['denominator']}"
        loss, met, grads = fused_call(name, _DATA["fused_inputs"][case["inputs"]], case["denominator"])
        _same(loss, unpack(case["loss"]), what + " loss")
        for g, want, n in zip(grads, case["grads"], ("h", "W", "b")):
            _same(g, unpack(want), f"{what} ∂/∂{n}")
        _same_metrics(met, case["metrics"], what)
