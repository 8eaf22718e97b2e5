"""dppo.divergence against hand-worked numbers, float64 references, and the lower-bound chain of App. B."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dppo import divergence as div
from dppo.divergence import binary_kl, binary_tv, exact_kl, exact_tv, topk_kl, topk_tv


def L(x: float) -> torch.Tensor:
    return torch.tensor([math.log(x)])


# ----------------------------------------------------------------------------------------------------------------
# Worked examples (paper §4.2; paper-notes §6.2), each recomputed by hand in float64 in the test.
@pytest.mark.parametrize(
    "mu,pi,tv,kl",
    [
        (1e-4, 1e-2, 0.0099, 1e-4 * math.log(1e-4 / 1e-2) + (1 - 1e-4) * math.log((1 - 1e-4) / (1 - 1e-2))),
        (0.99, 0.80, 0.19, 0.99 * math.log(0.99 / 0.80) + 0.01 * math.log(0.01 / 0.20)),
        (0.9, 0.99, 0.09, 0.9 * math.log(0.9 / 0.99) + 0.1 * math.log(0.1 / 0.01)),
    ],
)
def test_worked_examples(mu, pi, tv, kl):
    assert binary_tv(L(pi), L(mu)).item() == pytest.approx(tv, rel=1e-5)
    assert binary_kl(L(pi), L(mu)).item() == pytest.approx(kl, rel=1e-5)


def test_worked_example_rounded_values_of_the_notes():
    assert binary_kl(L(1e-2), L(1e-4)).item() == pytest.approx(0.00949, abs=5e-6)
    assert binary_kl(L(0.80), L(0.99)).item() == pytest.approx(0.181, abs=5e-4)
    assert binary_kl(L(0.99), L(0.9)).item() == pytest.approx(0.144, abs=5e-4)


# ----------------------------------------------------------------------------------------------------------------
# Numerics: p → 1, p → 0, π = 0, bf16, over-full top-K mass.
def _ref_binary(lp: float, lmu: float) -> tuple[float, float]:
    """float64 reference with log1p/expm1 (independent of the library's formulas)."""
    p, m = math.exp(lp), math.exp(lmu)
    one_m_p, one_m_m = -math.expm1(lp), -math.expm1(lmu)
    kl = m * (lmu - lp) + (one_m_m * (math.log(one_m_m) - math.log(one_m_p)) if one_m_m > 0 else 0.0)
    return abs(p - m), kl


@pytest.mark.parametrize(
    "lp,lmu",
    [
        (-1e-7, -3e-7),  # both p ≈ 1 − 1e-7: naive 1 − exp(logp) cancels every digit in fp32
        (-2e-6, -1e-9),
        (-30.0, -25.0),  # both tiny
        (-0.5, -0.50001),
        (-1e-3, -20.0),
    ],
)
def test_binary_matches_float64_reference_at_extremes(lp, lmu):
    lp, lmu = torch.tensor(lp).item(), torch.tensor(lmu).item()  # the fp32 values the library actually sees
    tv_ref, kl_ref = _ref_binary(lp, lmu)
    tv = binary_tv(torch.tensor([lp]), torch.tensor([lmu])).item()
    kl = binary_kl(torch.tensor([lp]), torch.tensor([lmu])).item()
    assert tv == pytest.approx(tv_ref, rel=1e-5, abs=1e-12)
    # KL of two close distributions is a difference of two O(|π−μ|) terms: fp32 leaves ~1e-12 absolute
    assert kl == pytest.approx(kl_ref, rel=1e-4, abs=1e-12)


def test_pi_zero_is_documented_and_never_nan():
    lp = torch.tensor([float("-inf"), float("-inf"), -1.0])
    lmu = torch.tensor([math.log(0.3), float("-inf"), float("-inf")])
    tv = binary_tv(lp, lmu)
    kl = binary_kl(lp, lmu)
    assert not torch.isnan(tv).any() and not torch.isnan(kl).any()
    assert tv[0].item() == pytest.approx(0.3, rel=1e-6)  # TV = μ exactly
    assert kl[0].item() == float("inf")  # μ(a_t) > 0 = π(a_t): KL(μ‖π) is infinite, the true value
    assert tv[1].item() == 0.0 and kl[1].item() == 0.0  # μ = π = 0
    assert tv[2].item() == pytest.approx(math.exp(-1.0), rel=1e-6)  # μ = 0: TV = π
    # μ = 0 ⇒ KL = Σ 0·log(0/π) + 1·log(1/(1−π))
    assert kl[2].item() == pytest.approx(-math.log1p(-math.exp(-1.0)), rel=1e-5)


def test_pi_one_in_fp32_gives_finite_kl():
    # fp32 log_softmax returns exactly 0 for a token of prob > 1 − 6e-8: the rest mass is floored, not −inf.
    kl = binary_kl(torch.tensor([0.0]), torch.tensor([math.log(0.999)]))
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(0.999 * math.log(0.999) + 0.001 * math.log(0.001 / 1e-12), rel=1e-4)


def test_bf16_inputs_equal_fp32_of_same_values():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(64, 50, generator=g), -1)[:, 0].bfloat16()
    lmu = torch.log_softmax(torch.randn(64, 50, generator=g), -1)[:, 0].bfloat16()
    for fn in (binary_tv, binary_kl):
        out = fn(lp, lmu)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(lp.float(), lmu.float()), rtol=0, atol=0)


def test_topk_mass_slightly_over_one_is_clamped():
    # listed μ-mass 1 + 1e-6 (engine rounding): the "other" cell is clamped to 0, result finite and correct.
    K = 3
    probs = torch.tensor([0.5, 0.3, 0.2 + 1e-6])
    lmu_top = probs.log()[None]
    lpi_top = torch.tensor([0.4, 0.4, 0.2]).log()[None]
    tv = topk_tv(lpi_top[:, 0], lmu_top[:, 0], lpi_top, lmu_top, torch.tensor([True]))
    kl = topk_kl(lpi_top[:, 0], lmu_top[:, 0], lpi_top, lmu_top, torch.tensor([True]))
    assert torch.isfinite(tv).all() and torch.isfinite(kl).all()
    assert tv.item() == pytest.approx(0.5 * (0.1 + 0.1 + 1e-6), abs=1e-6)
    assert K == lpi_top.shape[-1]


def test_sampled_token_in_topk_is_not_counted_twice():
    mu = torch.tensor([0.5, 0.2, 0.1, 0.2])
    pi = torch.tensor([0.3, 0.3, 0.2, 0.2])
    top = torch.tensor([0, 1])
    # a_t = 1 is in the top-2 → cells {0}, {1}, other{2,3}
    tv_in = topk_tv(pi[1].log()[None], mu[1].log()[None], pi[top].log()[None], mu[top].log()[None], torch.tensor([True]))
    assert tv_in.item() == pytest.approx(0.5 * (0.2 + 0.1 + 0.1), abs=1e-6)
    # a_t = 2 is not → cells {0}, {1}, {2}, other{3}
    tv_out = topk_tv(pi[2].log()[None], mu[2].log()[None], pi[top].log()[None], mu[top].log()[None], torch.tensor([False]))
    assert tv_out.item() == pytest.approx(0.5 * (0.2 + 0.1 + 0.1 + 0.0), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Lower bounds: binary ≤ top-K ≤ exact (App. B), over generated distribution families.
def _family(kind: str, n: int, V: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return 2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)
    if kind == "long_tail":  # Zipf-like, exponent 1.1, random order
        z = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float64))
        return z[torch.argsort(torch.rand(n, V, generator=g), dim=-1)] + 0.5 * torch.randn(n, V, generator=g, dtype=torch.float64)
    if kind == "peaked":
        x = torch.randn(n, V, generator=g, dtype=torch.float64)
        x[torch.arange(n), torch.randint(V, (n,), generator=g)] += 8.0
        return x
    if kind == "near_one_hot":
        x = torch.randn(n, V, generator=g, dtype=torch.float64)
        x[torch.arange(n), torch.randint(V, (n,), generator=g)] += 16.0
        return x
    raise AssertionError(kind)


def _estimates(mu_logits: torch.Tensor, pi_logits: torch.Tensor, K: int, g: torch.Generator, dtype=torch.float64,
               other: bool = False):
    """(binary, top-K, exact) TV and KL from float64 full distributions, a_t sampled from μ; the per-token
    log-probs go to the estimators in ``dtype`` (fp32: what an inference engine returns), the exact one sees fp64.
    ``other=True`` also returns the true (fp64) masses of the "other" cell, (μ_o, π_o)."""
    lmu = torch.log_softmax(mu_logits, -1)
    lpi = torch.log_softmax(pi_logits, -1)
    ids = torch.multinomial(lmu.exp(), 1, generator=g).squeeze(-1)
    lmu_a, lpi_a = lmu.gather(-1, ids[:, None])[:, 0], lpi.gather(-1, ids[:, None])[:, 0]
    top_mu, top_ids = lmu.topk(K, dim=-1)
    top_pi = lpi.gather(-1, top_ids)
    in_top = (top_ids == ids[:, None]).any(-1)
    lpi_a, lmu_a, top_pi, top_mu = (x.to(dtype) for x in (lpi_a, lmu_a, top_pi, top_mu))
    args = (lpi_a, lmu_a, top_pi, top_mu, in_top)
    tv = (binary_tv(lpi_a, lmu_a), topk_tv(*args), exact_tv(pi_logits, mu_logits))
    kl = (binary_kl(lpi_a, lmu_a), topk_kl(*args), exact_kl(pi_logits, mu_logits))
    if not other:
        return tv, kl
    rest = torch.ones_like(lmu, dtype=torch.bool).scatter(-1, top_ids, False)
    rest[torch.arange(len(ids)), ids] = False
    return tv, kl, ((lmu.exp() * rest).sum(-1), (lpi.exp() * rest).sum(-1))


# fp32 rounding of masses near 1 (the "other" cell is 1 − Σ listed) allows this much slack.
TOL = 2e-6


@pytest.mark.parametrize("kind", ["gaussian", "long_tail", "peaked", "near_one_hot"])
@pytest.mark.parametrize("K", [1, 5, 20])
def test_lower_bound_chain_many_distributions(kind, K):
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{K}".encode()))  # str hash() differs per process
    n, V = 500, 300
    mu = _family(kind, n, V, g)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2.0  # from tiny to large policy moves
    pi = mu + scale * torch.randn(n, V, generator=g, dtype=torch.float64)
    (btv, ttv, etv), (bkl, tkl, ekl) = _estimates(mu, pi, K, g)
    assert (btv <= ttv + TOL).all(), (btv - ttv).max()
    assert (ttv <= etv + TOL).all(), (ttv - etv).max()
    assert (bkl <= tkl + TOL).all(), (bkl - tkl).max()
    assert (tkl <= ekl + TOL * (1 + ekl)).all(), (tkl - ekl).max()
    # the chain is not vacuous: top-K is strictly tighter than binary somewhere when K > 1
    if K > 1 and kind != "near_one_hot":  # near one-hot, one token holds ~all mass and both coincide
        assert (ttv > btv + 1e-4).any()


@pytest.mark.parametrize("kind", ["gaussian", "long_tail", "peaked", "near_one_hot"])
@pytest.mark.parametrize("K", [1, 5, 20])
def test_lower_bound_chain_fp32_inputs_within_documented_rounding(kind, K):
    # fp32 log-probs (engine output). Top-K's "other" cell is 1 − (sum of K+1 fp32 masses), so each side's is known
    # to r = (K+1)·eps_fp32. The divergence docstring's error model: a true π_o below that can round to 0 and be
    # floored at 1e-12, over-estimating by μ_o·log(π_o / max(1e-12, π_o − r)); μ_o's own rounding moves its term by
    # ≤ r·(log(1/1e-12) + 1). Beyond that, fp32 tolerance. Binary ≤ Top-K holds to that μ_o term and fp32 tolerance.
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{K}/fp32".encode()))
    n, V = 500, 300
    mu = _family(kind, n, V, g)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2.0
    pi = mu + scale * torch.randn(n, V, generator=g, dtype=torch.float64)
    (btv, ttv, etv), (bkl, tkl, ekl), (mu_o, pi_o) = _estimates(mu, pi, K, g, dtype=torch.float32, other=True)
    r = (K + 1) * torch.finfo(torch.float32).eps
    rounding = mu_o * torch.log(pi_o / (pi_o - r).clamp(min=1e-12)).clamp(min=0) + r * (math.log(1e12) + 1)
    assert (btv <= ttv + TOL).all() and (ttv <= etv + TOL).all()
    # Binary's rest mass is exact (log1mexp) but Top-K's "other" cell carries the same μ_o rounding as above, which
    # can lower Top-K-KL below Binary-KL by up to r·(log(1/1e-12) + 1) (seen: 5.5e-6 on near-one-hot rows, K = 20)
    assert (bkl <= tkl + TOL + r * (math.log(1e12) + 1)).all(), (bkl - tkl).max()
    assert (tkl.double() <= ekl.double() + TOL * (1 + ekl.double()) + rounding).all(), (tkl - ekl).max()


@settings(max_examples=300, deadline=None)
# Found by hypothesis on a fresh clone: K + 1 = V listed cells; summing them in fp32 left ~3e-7 of μ in "other"
# while π's rounded to 0, and the 1e-12 floor turned that into +3.6e-6 of KL. fp64 inputs are now summed in fp64.
@example(V=7, K=6, temp_mu=1.0, move=2.0, seed=180685)
@given(
    V=st.integers(2, 64),
    K=st.integers(1, 8),
    temp_mu=st.floats(0.1, 5.0),
    move=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_lower_bound_chain_property(V, K, temp_mu, move, seed):
    K = min(K, V)
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(4, V, generator=g, dtype=torch.float64) * temp_mu
    pi = mu + move * torch.randn(4, V, generator=g, dtype=torch.float64)
    (btv, ttv, etv), (bkl, tkl, ekl) = _estimates(mu, pi, K, g)
    assert (btv <= ttv + TOL).all() and (ttv <= etv + TOL).all()
    assert (bkl <= tkl + TOL).all() and (tkl <= ekl + TOL * (1 + ekl)).all()
    if K == V:  # every token listed: top-K is exact
        torch.testing.assert_close(ttv, etv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tkl, ekl, atol=1e-5, rtol=1e-4)
    # the same rows as fp32 engine log-probs: within the rounding model of the fp32 test above
    g = torch.Generator().manual_seed(seed)
    (btv, ttv, etv), (bkl, tkl, ekl), (mu_o, pi_o) = _estimates(mu, pi, K, g, dtype=torch.float32, other=True)
    r = (K + 1) * torch.finfo(torch.float32).eps
    rounding = mu_o * torch.log(pi_o / (pi_o - r).clamp(min=1e-12)).clamp(min=0) + r * (math.log(1e12) + 1)
    assert (btv <= ttv + TOL).all() and (ttv <= etv + TOL).all() and (bkl <= tkl + TOL).all()
    assert (tkl.double() <= ekl.double() + TOL * (1 + ekl.double()) + rounding).all()


def test_equality_cases_app_b():
    """TV: equality when μ − π keeps one sign inside every cell; KL: equality when μ/π is constant inside a cell."""
    g = torch.Generator().manual_seed(1)
    V, K, n = 50, 5, 64
    mu_logits = torch.randn(n, V, generator=g, dtype=torch.float64)
    lmu = torch.log_softmax(mu_logits, -1)
    top_mu, top_ids = lmu.topk(K, dim=-1)
    ids = top_ids[:, 0]  # a_t among the top-K
    # π: change logits on the top-K only → outside the top-K π/μ is one constant ⇒ top-K KL = exact KL,
    # and μ − π has one sign over the whole "other" cell ⇒ top-K TV = exact TV.
    bump = torch.zeros(n, V, dtype=torch.float64).scatter(-1, top_ids, torch.randn(n, K, generator=g, dtype=torch.float64))
    pi_logits = mu_logits + bump
    lpi = torch.log_softmax(pi_logits, -1)
    args = (lpi.gather(-1, ids[:, None])[:, 0], lmu.gather(-1, ids[:, None])[:, 0], lpi.gather(-1, top_ids), top_mu,
            torch.ones(n, dtype=torch.bool))
    torch.testing.assert_close(topk_tv(*args), exact_tv(pi_logits, mu_logits), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(topk_kl(*args), exact_kl(pi_logits, mu_logits), atol=1e-6, rtol=1e-5)
    # Binary: changing only a_t's logit ⇒ every other token scales by one constant ⇒ binary KL = exact KL, and
    # all other tokens move the same way ⇒ binary TV = exact TV.
    only_a = torch.zeros(n, V, dtype=torch.float64)
    only_a[torch.arange(n), ids] = torch.randn(n, generator=g, dtype=torch.float64)
    pi2 = mu_logits + only_a
    lpi2 = torch.log_softmax(pi2, -1)
    la_pi, la_mu = lpi2.gather(-1, ids[:, None])[:, 0], lmu.gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(binary_tv(la_pi, la_mu), exact_tv(pi2, mu_logits), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(binary_kl(la_pi, la_mu), exact_kl(pi2, mu_logits), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Exact divergences: chunked over rows, same as the unchunked formula.
def test_exact_chunked_equals_naive(monkeypatch):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 7, 101, generator=g)
    b = a + 0.3 * torch.randn(3, 7, 101, generator=g)
    p, q = torch.softmax(b, -1), torch.softmax(a, -1)  # μ = softmax(b) (rollout), π = softmax(a)
    tv_ref = 0.5 * (p - q).abs().sum(-1)
    kl_ref = (p * (p.log() - q.log())).sum(-1)
    monkeypatch.setattr(div, "_EXACT_CHUNK_ELEMS", 101 * 4)  # 4 rows at a time → 6 chunks
    torch.testing.assert_close(exact_tv(a, b), tv_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(exact_kl(a, b), kl_ref, atol=1e-6, rtol=1e-5)
    assert exact_tv(a, b).shape == (3, 7)


def test_exact_chunk_bound_at_qwen_vocab():
    # at V = 151,936 a chunk is ~110 rows: one [chunk, V] fp32 temporary is 64 MiB, not [N, V]
    assert max(1, div._EXACT_CHUNK_ELEMS // 151_936) * 151_936 * 4 <= 64 * 2**20


def test_exact_bf16_logits_same_as_fp32():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 1000, generator=g).bfloat16()
    b = (a.float() + 0.2 * torch.randn(16, 1000, generator=g)).bfloat16()
    torch.testing.assert_close(exact_tv(a, b), exact_tv(a.float(), b.float()), rtol=0, atol=0)
    torch.testing.assert_close(exact_kl(a, b), exact_kl(a.float(), b.float()), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: binary_tv(torch.tensor([-1.0]), torch.tensor([-1.0, -2.0])), ValueError, "rollout_logp.*shape"),
        (lambda: binary_tv(torch.tensor([1]), torch.tensor([1])), TypeError, "logp.*floating"),
        (lambda: binary_kl(torch.tensor([float("nan")]), torch.tensor([-1.0])), ValueError, "logp contains NaN"),
        (lambda: binary_kl(torch.tensor([-1.0]), torch.tensor([float("inf")])), ValueError, "rollout_logp.*inf"),
        (lambda: binary_tv(torch.tensor([0.5]), torch.tensor([-1.0])), ValueError, "logp.*> 0"),
        (lambda: binary_tv([-1.0], torch.tensor([-1.0])), TypeError, "logp must be a torch.Tensor"),
        (
            lambda: topk_tv(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.full((1, 3), -2.0),
                            torch.full((1, 4), -2.0), torch.tensor([False])),
            ValueError, "same K",
        ),
        (
            lambda: topk_kl(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.full((1, 3), -2.0),
                            torch.full((1, 3), -2.0), torch.tensor([0])),
            TypeError, "sampled_in_topk.*bool",
        ),
        (
            lambda: topk_kl(torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0]), torch.full((1, 3), -2.0),
                            torch.full((1, 3), -2.0), torch.tensor([False, False])),
            ValueError, "logp_at_rollout_topk has shape",
        ),
        (lambda: exact_tv(torch.zeros(2, 5), torch.zeros(2, 6)), ValueError, "rollout_logits.*shape"),
        (lambda: exact_kl(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5)), TypeError, "logits"),
        (lambda: exact_kl(torch.full((2, 5), float("nan")), torch.zeros(2, 5)), ValueError, "logits contains NaN"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
