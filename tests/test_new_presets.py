"""IPO, IcePop, VACO, KPop, VESPO, the off-policy sequence mask and DRO against plain-float references written from
their sources, token by token (per cell).

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
  * KPop: prime-rl ``src/prime_rl/trainer/rl/loss.py::kpop_loss_fn`` at commit b9ba060 (PR #3283): probabilities
    clamped to [1e-6, 1 − 1e-6]; D_B(p‖q) = p·log(p/q) + (1−p)·log((1−p)/(1−q)); ``is_masked = D_B(π‖μ) > φ or
    D_B(μ‖π) > φ``; ``per_token = −keep·A·exp(lp − lμ) + kl_tau·(lp − lμ)²``; φ = 0.1.
  * VESPO: TRL ``GRPOTrainer.get_gamma_weights`` (trl#5199, main at f2cd577): log w = clamp(Σ_t clamp(lp − lold,
    ±20)·m, log 1e-8, 20); (k, λ) by A ≥ 0; φ = exp(λ + k·log w − λ·w), NaN/inf → 0; ``per_token = −φ·A·lp``;
    summed over tokens / the token count (its "dapo"-style normaliser; the official recipe: token-mean).
  * Off-policy sequence mask: TRL ``GRPOTrainer.get_off_policy_mask`` (trl#4689 and its fixes, main at f2cd577):
    mean over the response of (l_sampling − lp); keep iff A ≥ 0 or mean ≤ δ; multiplies the PPO-clip token loss.
  * DRO: verl ``core_algos.compute_policy_loss_dro`` (verl#7245, commit ddfbf4e): ``−(lp·A − 0.5·β·(lp − lold)²)``,
    aggregated by agg_loss (token-mean).
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
    eps, tau = m.delta_low, (m.penalty.coef if m.penalty is not None else 0.0)
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


# ---------------------------------------------------------------------------------------------------------------
def _batch(seqs):
    """[B, T] float64 tensors (π, μ, mask, Â) from sequences {"adv": a, "tok": [(π, μ), …]}, right-padded."""
    B, T = len(seqs), max(len(s["tok"]) for s in seqs)
    pi, mu = torch.full((B, T), 0.5, dtype=torch.float64), torch.full((B, T), 0.5, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        for t, (p, u) in enumerate(s["tok"]):
            pi[b, t], mu[b, t], mask[b, t] = p, u, True
    return pi, mu, mask, torch.tensor([s["adv"] for s in seqs], dtype=torch.float64)


def _run(spec, seqs):
    pi, mu, mask, adv = _batch(seqs)
    lp = pi.log().requires_grad_(True)
    loss, met = policy_loss(spec, lp, mu.log(), adv, mask)
    loss.backward()
    return loss, met, lp.grad, mask


def bkl(p: float, q: float) -> float:
    """Bernoulli KL D_B(p‖q) = p·log(p/q) + (1−p)·log((1−p)/(1−q))."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def ref_kpop(pi: float, mu: float, adv: float, phi: float, tau: float):
    """prime-rl kpop_loss_fn for one token: (value, d value/d log π, masked, (D_B(π‖μ) > φ, D_B(μ‖π) > φ))."""
    eps = 1e-6
    p, q = min(max(pi, eps), 1 - eps), min(max(mu, eps), 1 - eps)
    fwd, rev = bkl(p, q), bkl(q, p)
    masked = fwd > phi or rev > phi
    log_r = math.log(pi) - math.log(mu)
    pg = 0.0 if masked else adv * math.exp(log_r)
    return -pg + tau * log_r**2, -pg + 2 * tau * log_r, masked, (fwd > phi, rev > phi)


@pytest.mark.parametrize("spec,tau", [("kpop", 0.0), ("kpop@penalty.coef=1e-3", 1e-3)])
def test_kpop_matches_prime_rl_per_cell(spec, tau):
    phi = 0.1
    mus = [0.02, 0.05, 0.2, 0.3, 0.6, 0.8, 0.95]
    pis = [0.002, 0.01, 0.03, 0.05, 0.06, 0.1, 0.2, 0.35, 0.45, 0.5, 0.7, 0.8, 0.85, 0.93, 0.95, 0.97, 0.995]

    def near(mu, pi, a):  # on the threshold, where our fp32 estimate and the float64 reference may part
        return abs(pi - mu) < 1e-9 or min(abs(bkl(pi, mu) - phi), abs(bkl(mu, pi) - phi)) < 1e-4

    rows = _filtered(itertools.product(mus, pis, [0.7, -1.3, 0.0]), near)
    loss, met, grad, _ = _run(spec, [{"adv": a, "tok": [(p, u)]} for u, p, a in rows])
    ref = [ref_kpop(p, u, a, phi, tau) for u, p, a in rows]
    n = len(rows)
    assert loss.item() == pytest.approx(sum(r[0] for r in ref) / n, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad[:, 0], torch.tensor([r[1] / n for r in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert met["masked_frac"] == pytest.approx(sum(r[2] for r in ref) / n)
    # every cell: sign(Â) × π above/below μ × which of the two Bernoulli KLs exceeds φ (neither, one, the other, both)
    cells = {(a > 0, p > u, *r[3]) for (u, p, a), r in zip(rows, ref) if a != 0}
    assert cells == set(itertools.product([True, False], repeat=4)), set(itertools.product([True, False],
                                                                                            repeat=4)) - cells
    # the mask ignores Â's sign: Â > 0 with π below μ (Â pushes π back up towards μ; DPPO never masks it) is masked
    # whenever either KL exceeds φ
    assert any(r[2] and a > 0 and p < u for (u, p, a), r in zip(rows, ref))


def test_kpop_extreme_probabilities_stay_finite():
    """π or μ at 1e-9 or 1 − 1e-9 (where prime-rl clamps to [1e-6, 1 − 1e-6]): finite loss and gradient, and the
    token is masked either way (both KLs are far above φ)."""
    rows = [(1e-9, 0.5), (0.5, 1e-9), (1 - 1e-9, 0.5), (0.5, 1 - 1e-9)]
    loss, met, grad, _ = _run("kpop", [{"adv": 1.0, "tok": [r]} for r in rows])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert met["masked_frac"] == 1.0 and all(ref_kpop(p, u, 1.0, 0.1, 0.0)[2] for p, u in rows)


# ---------------------------------------------------------------------------------------------------------------
def ref_vespo(seqs, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    """TRL get_gamma_weights + the vespo loss: per token (value, gradient) / N and per sequence (region, φ)."""
    n = sum(len(s["tok"]) for s in seqs)
    out, seq = [], []
    for s in seqs:
        adv = s["adv"]
        raw = sum(min(max(math.log(p) - math.log(u), -20.0), 20.0) for p, u in s["tok"])
        log_w = min(max(raw, math.log(1e-8)), 20.0)
        w = math.exp(log_w)
        k, lam = (k_pos, lam_pos) if adv >= 0 else (k_neg, lam_neg)
        phi = math.exp(lam + k * log_w - lam * w)
        region = "low clamp" if raw < math.log(1e-8) else "high clamp" if raw > 20 else (
            "rising" if w < k / lam else "falling")  # φ peaks at w = k/λ
        seq.append((adv, region, phi))
        out += [(-phi * adv * math.log(p) / n, -phi * adv / n) for p, _ in s["tok"]]
    return out, seq


def _vespo_batch():
    rnd = random.Random(1)
    seqs = []
    for b in range(48):
        kind = b % 6
        toks = []
        for _ in range(rnd.randint(1, 5)):
            u = rnd.uniform(0.05, 0.9)
            r = {0: 1.0, 1: rnd.uniform(0.3, 0.9), 2: rnd.uniform(1.1, 1.6), 3: 1e-4, 4: rnd.uniform(0.6, 1.5),
                 5: 1.0}[kind]
            toks.append((min(u * r, 0.999), u))
        if kind == 5:  # a huge sequence ratio: μ(a_t) ≈ 1e-12 → per-token log-ratio clamped at 20, sum at 20
            toks = [(0.5, 1e-12), (0.6, 1e-12)]
        seqs.append({"adv": [0.7, -1.3, 0.0, 1.1][(b // 6) % 4], "tok": toks})
    return seqs


def test_vespo_matches_trl_per_cell():
    seqs = _vespo_batch()
    loss, met, grad, mask = _run("vespo", seqs)
    ref, seq = ref_vespo(seqs)
    assert loss.item() == pytest.approx(sum(v for v, _ in ref), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad[mask], torch.tensor([g for _, g in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert (grad[~mask] == 0).all()
    n_zero = sum(len(s["tok"]) for s, (_, _, phi) in zip(seqs, seq) if phi == 0.0)
    assert n_zero > 0 and met["seq_dropped_frac"] == pytest.approx(n_zero / len(ref))  # φ(e^20) underflows to 0
    # cells: sign(Â) (Â = 0 takes the positive branch) × where w lies on φ (both clamps, either side of its peak)
    cells = {(adv >= 0, region) for adv, region, _ in seq}
    assert cells == set(itertools.product([True, False], ["low clamp", "rising", "falling", "high clamp"]))


def test_vespo_weight_is_one_on_policy_and_detached():
    """w = 1 (π = μ): φ(1) = e^λ·e^(−λ) = 1, so the gradient is the plain policy gradient −Â·∇log π / N."""
    seqs = [{"adv": 0.5, "tok": [(0.3, 0.3), (0.6, 0.6)]}, {"adv": -2.0, "tok": [(0.2, 0.2)]}]
    _, _, grad, mask = _run("vespo", seqs)
    torch.testing.assert_close(grad[mask], torch.tensor([-0.5 / 3, -0.5 / 3, 2.0 / 3], dtype=torch.float64),
                               rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------------------------
def ref_offpolicy(seqs, delta=0.5, eps=0.2):
    """TRL get_off_policy_mask × GRPO's PPO-clip on π/μ: per token (value, gradient) / N and cells."""
    n = sum(len(s["tok"]) for s in seqs)
    out = []
    for s in seqs:
        adv = s["adv"]
        mean_k1 = sum(math.log(u) - math.log(p) for p, u in s["tok"]) / len(s["tok"])
        keep = adv >= 0 or mean_k1 <= delta
        for p, u in s["tok"]:
            v, g = ppo_clip(p / u, adv, eps, eps)
            clipped = (adv > 0 and p / u > 1 + eps) or (adv < 0 and p / u < 1 - eps)
            out.append(((v if keep else 0.0) / n, (g if keep else 0.0) / n, (adv > 0, adv < 0, mean_k1 > delta,
                                                                             clipped, keep)))
    return out


def _offpolicy_batch():
    rnd = random.Random(2)
    seqs = []
    for b in range(60):
        drift = [0.15, 0.9, 2.5, 0.25][b % 4]  # half the tokens π = μ·drift: mean log(μ/π) > 0.5 for 0.15, often 0.25
        toks = []
        for _ in range(rnd.randint(2, 6)):
            u = rnd.uniform(0.05, 0.35)
            toks.append((min(u * rnd.choice([drift, drift, 1.0, 1.5]), 0.99), u))
        seqs.append({"adv": [0.7, -1.3, 0.0, -0.4, 1.2][(b // 4) % 5], "tok": toks})
    return seqs


def test_offpolicy_sequence_mask_matches_trl_per_cell():
    seqs = [s for s in _offpolicy_batch()
            if abs(sum(math.log(u / p) for p, u in s["tok"]) / len(s["tok"]) - 0.5) > 1e-6]
    loss, met, grad, mask = _run("offpolicy-seq-mask", seqs)
    ref = ref_offpolicy(seqs)
    n = len(ref)
    assert loss.item() == pytest.approx(sum(v for v, _, _ in ref), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad[mask], torch.tensor([g for _, g, _ in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert met["seq_dropped_frac"] == pytest.approx(sum(not c[4] for _, _, c in ref) / n)
    over = [sum(math.log(u / p) for p, u in s["tok"]) / len(s["tok"]) > 0.5 for s in seqs]
    assert met["seq_masked_frac"] == pytest.approx(sum(over) / len(seqs))
    # cells: sign(Â) (+, −, 0) × mean log(μ/π) over δ × PPO clip active on the pushed side; dropped only where Â < 0
    cells = {c[:4] for _, _, c in ref}
    want = {(pos, neg, o, cl) for pos, neg in [(True, False), (False, True), (False, False)]
            for o in (True, False) for cl in (True, False) if not (cl and not (pos or neg))}
    assert cells == want, want - cells
    assert all(c[4] or c[1] for _, _, c in ref)


# ---------------------------------------------------------------------------------------------------------------
def ref_dro(pi: float, mu: float, adv: float, beta: float = 0.05):
    """verl compute_policy_loss_dro for one token: (value, d value/d log π)."""
    lr = math.log(pi) - math.log(mu)
    return -(math.log(pi) * adv - 0.5 * beta * lr**2), -adv + beta * lr


def test_dro_matches_verl_per_cell():
    mus = [0.05, 0.3, 0.6, 0.95]
    pis = [0.001, 0.02, 0.25, 0.5, 0.8, 0.999]
    rows = _filtered(itertools.product(mus, pis, [0.7, -1.3, 0.0]), lambda u, p, a: abs(p - u) < 1e-9)
    loss, met, grad, _ = _run("dro", [{"adv": a, "tok": [(p, u)]} for u, p, a in rows])
    ref = [ref_dro(p, u, a) for u, p, a in rows]
    n = len(rows)
    assert loss.item() == pytest.approx(sum(v for v, _ in ref) / n, rel=1e-12)
    torch.testing.assert_close(grad[:, 0], torch.tensor([g / n for _, g in ref], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert met["logratio_sq_mean"] == pytest.approx(sum((math.log(p / u)) ** 2 for u, p, _ in rows) / n, rel=1e-6)
    cells = {("+" if a > 0 else "-" if a < 0 else "0", p > u) for u, p, a in rows}
    assert cells == set(itertools.product("+-0", [True, False]))
    # the penalty acts where Â = 0 too (verl: it stands outside the advantage)
    assert all(g != 0 for (u, p, a), (_, g) in zip(rows, ref) if a == 0)
    assert all(grad[i, 0] != 0 for i, (u, p, a) in enumerate(rows) if a == 0)
