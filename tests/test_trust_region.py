"""dppo.trust_region: every cell of the direction-aware masks, the relax ablations, TRM, and the ε_t = δ/μ identity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dppo.divergence import binary_tv
from dppo.trust_region import dppo_mask, ratio_mask, sequence_mask


def T(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


@pytest.mark.parametrize("adv,up,big", list(itertools.product([1.0, -1.0], [True, False], [True, False])))
def test_dppo_mask_cells(adv, up, big):
    lmu = math.log(0.5)
    lp = math.log(0.6) if up else math.log(0.4)
    d = 0.3 if big else 0.01
    m = dppo_mask(T(d), T(lp), T(lmu), T(adv), delta_low=0.1, delta_high=0.2)
    blocked = big and ((adv > 0 and up) or (adv < 0 and not up))
    assert m.item() == (0.0 if blocked else 1.0)
    assert m.dtype == torch.float32 and not m.requires_grad


def test_dppo_mask_separate_thresholds_and_boundary():
    lmu = T(math.log(0.5), math.log(0.5))
    lp = T(math.log(0.7), math.log(0.3))
    adv = T(1.0, -1.0)
    d = T(0.15, 0.15)
    # δ_high = 0.2 keeps the rising token, δ_low = 0.1 masks the falling one
    assert dppo_mask(d, lp, lmu, adv, delta_low=0.1, delta_high=0.2).tolist() == [1.0, 0.0]
    assert dppo_mask(d, lp, lmu, adv, delta_low=0.2, delta_high=0.1).tolist() == [0.0, 1.0]
    # a divergence exactly at δ is kept (Eq. 12 uses a strict D > δ)
    assert dppo_mask(d, lp, lmu, adv, delta_low=0.15, delta_high=0.15).tolist() == [1.0, 1.0]
    # A = 0 is never masked
    assert dppo_mask(d, lp, lmu, T(0.0, 0.0), delta_low=0.0, delta_high=0.0).tolist() == [1.0, 1.0]


def test_dppo_mask_is_detached_even_from_grad_inputs():
    lp = T(math.log(0.9)).requires_grad_(True)
    m = dppo_mask(T(0.5), lp, T(math.log(0.1)), T(1.0), 0.1, 0.1)
    assert not m.requires_grad and m.item() == 0.0


@pytest.mark.parametrize("adv,r", list(itertools.product([1.0, -1.0], [0.5, 0.9, 1.1, 1.25, 1.3, 2.0])))
def test_ratio_mask_clip_higher(adv, r):
    lmu = math.log(0.4)
    lp = lmu + math.log(r)
    m = ratio_mask(T(lp), T(lmu), T(adv), eps_low=0.2, eps_high=0.28).item()
    blocked = (adv > 0 and r > 1.28) or (adv < 0 and r < 0.8)
    assert m == (0.0 if blocked else 1.0)


@pytest.mark.parametrize("mu", [0.05, 0.5])
@pytest.mark.parametrize("side", ["low", "high", "both"])
def test_ratio_mask_relax(mu, side):
    lmu = math.log(mu)
    lp = T(lmu + math.log(1.8), lmu + math.log(0.5))  # one token far up, one far down
    adv = T(1.0, -1.0)
    kw = {"relax_low_below": 0.1 if side in ("low", "both") else 0.0,
          "relax_high_below": 0.1 if side in ("high", "both") else 0.0}
    m = ratio_mask(lp, T(lmu, lmu), adv, 0.2, 0.28, **kw).tolist()
    rare = mu < 0.1
    assert m[0] == (1.0 if rare and side in ("high", "both") else 0.0)
    assert m[1] == (1.0 if rare and side in ("low", "both") else 0.0)


def test_ratio_mask_infinite_and_large_eps():
    lp, lmu = T(math.log(0.9), math.log(0.01)), T(math.log(0.01), math.log(0.9))
    adv = T(1.0, -1.0)
    assert ratio_mask(lp, lmu, adv, eps_low=1.0, eps_high=math.inf).tolist() == [1.0, 1.0]
    assert ratio_mask(lp, lmu, adv, eps_low=0.2, eps_high=0.2).tolist() == [0.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(
    mu=st.floats(1e-6, 1.0 - 1e-6),
    pi=st.floats(1e-6, 1.0 - 1e-6),
    adv=st.sampled_from([-1.0, 1.0]),
    delta=st.floats(0.01, 0.5),
)
def test_binary_tv_dppo_is_ppo_with_token_adaptive_eps(mu, pi, adv, delta):
    """|π − μ| = μ·|r − 1|, so DPPO-Binary-TV ≡ PPO with ε_t = δ / μ(a_t) (paper-notes §2)."""
    lp, lmu = T(math.log(pi)), T(math.log(mu))
    d = binary_tv(lp, lmu)
    if abs(abs(pi - mu) - delta) < 1e-5:  # fp32 ties at the boundary are not the identity's business
        return
    dppo = dppo_mask(d, lp, lmu, T(adv), delta, delta).item()
    eps_t = delta / mu
    ppo = ratio_mask(lp, lmu, T(adv), eps_low=eps_t, eps_high=eps_t).item()
    assert dppo == ppo


def test_sequence_mask_trm():
    d = torch.tensor([[0.01, 0.02, 0.9], [0.01, 0.04, 0.03], [0.5, 0.0, 0.0]])
    resp = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # row 0: the 0.9 is padding → kept; row 1: max 0.04 ≤ 0.05 kept; row 2: no response tokens → kept
    assert sequence_mask(d, resp, 0.05).tolist() == [1.0, 1.0, 1.0]
    assert sequence_mask(d, resp, 0.035).tolist() == [1.0, 0.0, 1.0]
    resp[0, 2] = True
    assert sequence_mask(d, resp, 0.05).tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: dppo_mask(T(0.1), T(-1.0), T(-1.0), T(1.0, 2.0), 0.1, 0.1), ValueError, "advantages.*shape"),
        (lambda: dppo_mask(T(0.1), T(-1.0), T(-1.0), T(1.0), -0.1, 0.1), ValueError, "delta_low"),
        (lambda: dppo_mask(T(0.1), T(-1.0), T(-1.0), torch.tensor([1]), 0.1, 0.1), TypeError, "advantages"),
        (lambda: ratio_mask(T(-1.0), T(-1.0), T(1.0), 0.2, float("nan")), ValueError, "eps_high"),
        (lambda: ratio_mask(T(-1.0), T(-1.0), T(1.0), 0.2, 0.2, relax_low_below=2.0), ValueError, "relax_low_below"),
        (lambda: sequence_mask(T(0.1, 0.2), torch.ones(2, dtype=torch.bool), 0.1), ValueError, r"\[B, T\]"),
        (lambda: sequence_mask(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool), 0.1), ValueError, "response_mask"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
