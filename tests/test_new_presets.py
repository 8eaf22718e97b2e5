"""IPO, IcePop and VACO against plain-float references written from their sources, token by token (per cell).

Sources read (the formulas below restate them; our code is not consulted):
  * IPO: prime-rl ``src/prime_rl/trainer/rl/loss.py::ipo_loss_fn`` at commit 559b447 (PR #2798's loss; #3418 renamed
    ``ipo_threshold`` to ``eps`` and made it the default, #3586 set eps = 0.3, kl_tau = 0): ``is_masked = |exp(lp) −
    exp(lμ)| > eps``; ``pg_loss = keep·A·exp(lp − lμ)`` (not detached); ``kl_loss = loss_mask·(lp − lμ)²``;
    ``per_token = −pg_loss + kl_tau·kl_loss``; summed and divided by the global token count.
  * IcePop: slime ``slime/backends/megatron_utils/loss.py::icepop_function`` at commit 624b824: ``ice_ratio =
    exp(old − rollout)``, weight = ice_ratio where low ≤ ice_ratio ≤ high else 0, times ``compute_policy_loss``'s
    ``max(−r·A, −clip(r, 1−ε, 1+ε)·A)`` with r = exp(lp − old); arXiv 2510.18855: α = 0.5, β = 5, ε = 0.2.
  * VACO: open-instruct ``open_instruct/grpo_utils.py::compute_rho_correction`` + ``compute_grpo_loss`` (dapo) at
    commit 5c2bf9a (PR #1755): divergence = |exp(lμ) − exp(old)| per token, its masked mean over each response;
    ``moving_away = sign(old − lμ)·A > 0``; drop = (mean > upper bound) & moving_away; weight = min(exp(old − lμ),
    rho_clamp_upper_bound = 2) where kept; pg = max(−A·r, −A·clip(r, 1 − 0.2, 1 + 0.272)); token-mean.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from dppo import PRESETS, policy_loss


def ppo_clip(ratio: float, adv: float, lo: float, hi: float) -> tuple[float, float]:
    """(value, d value / d log π) of max(−r·A, −clip(r, 1−lo, 1+hi)·A), with r = π/π_old."""
    l1 = -ratio * adv
    l2 = -min(max(ratio, 1 - lo), 1 + hi) * adv
    return max(l1, l2), (-ratio * adv if l1 >= l2 else 0.0)


def ref_ipo(pi: float, mu: float, adv: float, eps: float, tau: float) -> tuple[float, float, bool]:
    """prime-rl ipo_loss_fn for one token: (value, d value/d log π, masked)."""
    log_r = math.log(pi) - math.log(mu)
    masked = abs(pi - mu) > eps
    pg = 0.0 if masked else adv * math.exp(log_r)
    return -pg + tau * log_r**2, -pg + 2 * tau * log_r, masked


def ref_icepop(pi: float, old: float, mu: float, adv: float, lo=0.5, hi=5.0, eps=0.2) -> tuple[float, float, str]:
    """slime icepop_function × compute_policy_loss for one token: (value, gradient, band cell)."""
    k = old / mu
    w = k if lo <= k <= hi else 0.0
    v, g = ppo_clip(pi / old, adv, eps, eps)
    return w * v, w * g, "below" if k < lo else "above" if k > hi else "in"


def _filtered(rows, near):
    return [r for r in rows if not near(*r)]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ipo", "ipo-kl"])
def test_ipo_matches_prime_rl_per_cell(name):
    m = PRESETS[name]
    eps, tau = m.delta_low, m.kl_coef
    mus = [0.05, 0.3, 0.6, 0.95]
    pis = [0.001, 0.02, 0.1, 0.25, 0.5, 0.59, 0.8, 0.94, 0.96, 0.999]
    rows = _filtered(itertools.product(mus, pis, [0.7, -1.3, 0.0]),
                     lambda mu, pi, a: abs(pi - mu) < 1e-9 or abs(abs(pi - mu) - eps) < 1e-6)
    mu = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    pi = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    adv = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    lp = pi.log()[None].clone().requires_grad_(True)  # one sequence of N tokens: token-mean = mean over all
    loss, met = policy_loss(m, lp, mu.log()[None], adv[None], torch.ones_like(lp, dtype=torch.bool))
    loss.backward()
    ref = [ref_ipo(p, u, a, eps, tau) for u, p, a in rows]
    n = len(rows)
    assert loss.item() == pytest.approx(sum(v for v, _, _ in ref) / n, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(lp.grad[0], torch.tensor([g / n for _, g, _ in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert met["masked_frac"] == pytest.approx(sum(x for _, _, x in ref) / n)
    # every cell: sign(Â) × π above/below μ × |π − μ| over/under eps
    cells = {(a > 0, p > u, abs(p - u) > eps) for u, p, a in rows if a != 0}
    assert cells == set(itertools.product([True, False], repeat=3))
    # the mask ignores the advantage's sign: a rising token with Â < 0 beyond eps is masked (DPPO keeps it)
    assert any(x and a < 0 and p > u for (u, p, a), (_, _, x) in zip(rows, ref))


def test_ipo_penalty_flows_on_masked_tokens():
    """kl_tau·(log r)² is paid on every response token, masked or not (prime-rl: kl_loss = loss_mask·log_r²)."""
    lmu = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    lp = torch.log(torch.tensor([[0.95, 0.55]], dtype=torch.float64)).requires_grad_(True)  # |Δ| 0.45 > 0.1: masked
    loss, met = policy_loss("ipo-kl", lp, lmu, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2))
    loss.backward()
    assert met["masked_frac"] == 0.5
    assert lp.grad[0, 0].item() == pytest.approx(2e-3 * math.log(0.95 / 0.5) / 2, rel=1e-12)
    assert met["logratio_sq_mean"] == pytest.approx((math.log(1.9) ** 2 + math.log(1.1) ** 2) / 2, rel=1e-6)  # fp32


# ---------------------------------------------------------------------------------------------------------------
def _icepop_rows():
    rows = []
    for mu, b, rho, adv in itertools.product([0.02, 0.2, 0.5, 0.85], [0.3, 0.8, 1.25, 3.0, 7.0],
                                             [0.6, 0.9, 1.1, 1.5], [0.7, -1.3]):
        old = mu * b
        pi = old * rho
        if old < 0.995 and pi < 0.995:
            rows.append((pi, old, mu, adv))
    return rows


def test_icepop_matches_slime_per_cell():
    m = PRESETS["icepop"]
    rows = _icepop_rows()
    pi, old, mu, adv = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    lp = pi.log()[None].clone().requires_grad_(True)
    loss, met = policy_loss(m, lp, mu.log()[None], adv[None], torch.ones_like(lp, dtype=torch.bool),
                            old_logp=old.log()[None])
    loss.backward()
    ref = [ref_icepop(*r) for r in rows]
    n = len(rows)
    assert loss.item() == pytest.approx(sum(v for v, _, _ in ref) / n, rel=1e-12)
    torch.testing.assert_close(lp.grad[0], torch.tensor([g / n for _, g, _ in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert met["behavior_masked_frac"] == pytest.approx(sum(c != "in" for _, _, c in ref) / n)
    # cells: band (below / in / above) × sign(Â) × PPO clip active on the pushed side or not
    cells = {(c, a > 0, (a > 0 and p / o > 1.2) or (a < 0 and p / o < 0.8)) for (p, o, u, a), (_, _, c) in
             zip(rows, ref)}
    assert cells == set(itertools.product(["below", "in", "above"], [True, False], [True, False]))


def test_icepop_band_is_two_sided_whatever_the_advantage():
    """k = π_θ′/μ outside [0.5, 5] zeroes the token for either sign of Â (unlike a directional mask)."""
    lmu = torch.log(torch.tensor([[0.1, 0.1, 0.1, 0.1]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.04, 0.04, 0.6, 0.6]], dtype=torch.float64))  # k = 0.4, 0.4, 6, 6
    lp = old.clone().requires_grad_(True)  # π = π_θ′: r = 1, never clipped
    loss, _ = policy_loss("icepop", lp, lmu, torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64),
                          torch.ones(1, 4), old_logp=old)
    loss.backward()
    assert (lp.grad == 0).all() and loss.item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
def ref_vaco(seqs, U=0.2, cap=2.0, lo=0.2, hi=0.272):
    """open-instruct PR #1755 (VACO + dapo loss, loss_denominator="token"): per-token (value, gradient) lists and
    per-token cells (over, away, capped, clipped), normalised by the total token count."""
    n = sum(len(s["tok"]) for s in seqs)
    out = []
    for s in seqs:
        adv = s["adv"]
        mean_tv = sum(abs(u - o) for _, o, u in s["tok"]) / max(len(s["tok"]), 1)
        over = mean_tv > U
        for p, o, u in s["tok"]:
            d = math.log(o) - math.log(u)
            away = ((d > 0) - (d < 0)) * adv > 0  # torch.sign(·)·A > 0
            w = 0.0 if (over and away) else min(o / u, cap)
            v, g = ppo_clip(p / o, adv, lo, hi)
            clipped = (adv > 0 and p / o > 1 + hi) or (adv < 0 and p / o < 1 - lo)
            out.append((w * v / n, w * g / n, (over, away, o / u > cap, clipped)))
    return out


def _vaco_batch(seed: int):
    rnd = random.Random(seed)
    seqs = []
    for b in range(32):
        spread = [0.3, 0.9, 1.1, 2.5][b % 4]  # the behaviour gap of this sequence: mean TV small or large
        toks = []
        for _ in range(rnd.randint(1, 6)):
            mu = rnd.uniform(0.05, 0.6)
            o = min(mu * (spread if rnd.random() < 0.8 else 1 / spread), 0.97)
            p = min(o * rnd.choice([0.6, 0.9, 1.1, 1.5]), 0.99)
            toks.append((p, o, mu))
        seqs.append({"adv": rnd.choice([0.7, -1.3]), "tok": toks})
    return seqs


def test_vaco_matches_open_instruct_per_cell():
    seqs = _vaco_batch(0)
    B, T = len(seqs), max(len(s["tok"]) for s in seqs)
    pi, old, mu = (torch.full((B, T), 0.5, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        for t, (p, o, u) in enumerate(s["tok"]):
            pi[b, t], old[b, t], mu[b, t], mask[b, t] = p, o, u, True
    adv = torch.tensor([s["adv"] for s in seqs], dtype=torch.float64)
    lp = pi.log().requires_grad_(True)
    loss, met = policy_loss("vaco", lp, mu.log(), adv, mask, old_logp=old.log())
    loss.backward()
    ref = ref_vaco(seqs)
    assert loss.item() == pytest.approx(sum(v for v, _, _ in ref), rel=1e-12)
    torch.testing.assert_close(lp.grad[mask], torch.tensor([g for _, g, _ in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert (lp.grad[~mask] == 0).all()
    assert met["seq_dropped_frac"] == pytest.approx(sum(c[0] and c[1] for _, _, c in ref) / len(ref))
    assert met["behavior_capped_frac"] == pytest.approx(sum(c[2] for _, _, c in ref) / len(ref))
    # every cell of (sequence over U) × (move away) × (π_θ′/μ capped) × (PPO clip active) is exercised
    cells = {c for _, _, c in ref}
    assert cells == set(itertools.product([True, False], repeat=4)), set(itertools.product([True, False],
                                                                                            repeat=4)) - cells
