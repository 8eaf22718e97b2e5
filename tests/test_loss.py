"""dppo.policy_loss against a naive scalar reference of the paper's rules, per preset and per cell."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from dppo import PRESETS, Method, policy_loss
from dppo.aggregation import aggregate, aggregation_denominator, aggregation_weights
from dppo.loss import METRIC_KEYS
from dppo.methods import replace
from dppo.token_loss import sequence_gate, token_context, token_loss

ANCHORS = [0.05, 0.3, 0.6, 0.95]
PIS = [0.001, 0.02, 0.1, 0.25, 0.29, 0.31, 0.5, 0.59, 0.61, 0.8, 0.94, 0.96, 0.999]
ADVS = [0.7, -1.3]
V, K = 6, 2


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: plain Python floats, one token at a time, written from the paper's definitions.
def full_dist(p_a: float) -> list[float]:
    """A V-token distribution with token 0 = a_t at p_a and a fixed long-ish tail shape on the rest."""
    tail = [0.4, 0.25, 0.15, 0.12, 0.08]
    return [p_a] + [(1 - p_a) * t for t in tail]


def ref_topk(mu: list[float], pi: list[float], k: int, kind: str) -> float:
    top = sorted(range(len(mu)), key=lambda i: -mu[i])[:k]
    cells = [[i] for i in top] + ([[0]] if 0 not in top else [])
    listed = {i for c in cells for i in c}
    cells.append([i for i in range(len(mu)) if i not in listed])
    m = [sum(mu[i] for i in c) for c in cells]
    p = [sum(pi[i] for i in c) for c in cells]
    if kind == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(m, p))
    return sum(x * math.log(x / y) for x, y in zip(m, p) if x > 0)


def ref_divergence(est: str, pi_a: float, anchor_a: float) -> float:
    if est in ("binary_tv", "none"):
        return abs(pi_a - anchor_a)
    if est == "binary_kl":
        return anchor_a * math.log(anchor_a / pi_a) + (1 - anchor_a) * math.log((1 - anchor_a) / (1 - pi_a))
    if est == "ratio":
        return abs(pi_a / anchor_a - 1)
    return ref_topk(full_dist(anchor_a), full_dist(pi_a), K, est.split("_")[1])


def ref_blocked(m: Method, pi_a: float, anchor_a: float, adv: float) -> bool:
    if m.estimator == "none":
        return False
    if m.estimator == "ratio":
        r = pi_a / anchor_a
        pos = adv > 0 and r > 1 + m.delta_high and anchor_a >= m.mask.relax_high_below
        neg = adv < 0 and r < 1 - m.delta_low and anchor_a >= m.mask.relax_low_below
        return pos or neg
    d = ref_divergence(m.estimator, pi_a, anchor_a)
    return (adv > 0 and pi_a > anchor_a and d > m.delta_high) or (adv < 0 and pi_a < anchor_a and d > m.delta_low)


def ref_grad(m: Method, pi_a: float, mu_a: float, anchor_a: float, adv: float) -> float:
    """∂ℓ/∂log π for one token under 'sum' aggregation."""
    if m.loss_form == "drpo":
        r = pi_a / anchor_a
        return -adv * r + abs(adv) * anchor_a * (r - 1) * r / m.form.delta
    if ref_blocked(m, pi_a, anchor_a, adv):
        return 0.0
    return -adv * min(pi_a / mu_a, m.ratio_cap)  # Eq. 23


def cell(m: Method, pi_a: float, anchor_a: float, adv: float) -> tuple[bool, bool, bool]:
    return adv > 0, pi_a > anchor_a, ref_divergence(m.estimator, pi_a, anchor_a) > (m.delta_high if adv > 0 else m.delta_low)


# ---------------------------------------------------------------------------------------------------------------
def _on_boundary(m: Method, p: float, a: float) -> bool:
    """The token sits on a threshold (|π − μ| = 0.2 = δ, r = C, …) where fp32 rounding decides the side."""
    if m.estimator == "ratio":
        edges = [(p / a, 1 + m.delta_high), (p / a, 1 - m.delta_low)]
    elif m.estimator == "none":
        edges = []
    else:
        d = ref_divergence(m.estimator, p, a)
        edges = [(d, m.delta_low), (d, m.delta_high)]
    mu = a * 0.9 if m.anchor == "recompute" else a  # as _grid_batch sets μ
    edges.append((p / mu, m.ratio_cap))
    return any(math.isfinite(t) and abs(x - t) < 1e-5 * max(1.0, abs(t)) for x, t in edges)


def _grid_batch(m: Method):
    rows = list(itertools.product(ANCHORS, PIS, ADVS))
    rows = [(a, p, adv) for a, p, adv in rows if abs(p - a) > 1e-9 and not _on_boundary(m, p, a)]
    anchor = torch.tensor([a for a, _, _ in rows], dtype=torch.float64)
    pi = torch.tensor([p for _, p, _ in rows], dtype=torch.float64)
    adv = torch.tensor([x for _, _, x in rows], dtype=torch.float32)
    # With a recompute anchor, the rollout μ differs from π_θ′ (so r = π/μ ≠ π/π_θ′ is exercised).
    mu = anchor * 0.9 if m.anchor == "recompute" else anchor
    kw = {}
    if m.anchor == "recompute":
        kw["old_logp"] = anchor.log().float()[:, None]
    if m.needs_topk:
        mu_full = torch.tensor([full_dist(a) for a in anchor.tolist()], dtype=torch.float64)
        pi_full = torch.tensor([full_dist(p) for p in pi.tolist()], dtype=torch.float64)
        top = mu_full.topk(K, dim=-1).indices
        kw["logp_at_rollout_topk"] = pi_full.gather(-1, top).log().float()[:, None, :]
        kw["rollout_topk_logp"] = mu_full.gather(-1, top).log().float()[:, None, :]
        kw["sampled_in_topk"] = (top == 0).any(-1)[:, None]
    return rows, pi, mu, adv, kw


# IPO, IcePop, VACO and the four of issue 23 have their own references, written from their sources, in
# test_new_presets.py.
OWN_REFERENCE = ("ipo", "ipo-kl", "icepop", "vaco", "kpop", "vespo", "offpolicy-seq-mask", "dro")
EQ23_PRESETS = [n for n in PRESETS if n not in OWN_REFERENCE]


@pytest.mark.parametrize("name", EQ23_PRESETS)
def test_every_preset_every_cell_matches_reference(name):
    m = replace(PRESETS[name], aggregation="sum", seq_delta=math.inf)
    rows, pi, mu, adv, kw = _grid_batch(m)
    lp = pi.log().float()[:, None].requires_grad_(True)
    loss, _ = policy_loss(m, lp, mu.log().float()[:, None], adv, torch.ones_like(lp, dtype=torch.bool), **kw)
    loss.backward()
    got = lp.grad[:, 0]
    want = torch.tensor([ref_grad(m, p, mu_i, a, x) for (a, p, x), mu_i in zip(rows, mu.tolist())])
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=1e-6)
    zero = got == 0
    blocked = torch.tensor([ref_blocked(m, p, a, x) for a, p, x in rows])
    if m.loss_form != "drpo":
        assert torch.equal(zero, blocked)  # exactly the blocked tokens get zero gradient
    if m.estimator != "none":
        # the grid covers every cell of sign(Â) × (π above/below anchor) × (D above/below the threshold)
        seen = {cell(m, p, a, x) for a, p, x in rows}
        reachable = {
            c for c in itertools.product([True, False], repeat=3)
            if not (c[2] and (m.delta_high if c[0] else m.delta_low) == math.inf)
        }
        assert reachable <= seen, reachable - seen
        assert blocked.any() and (~blocked).any()


def test_grpo_ppo_clip_form_and_eq23_form_same_gradient():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 12
    lmu = torch.log_softmax(torch.randn(B, T, 30, generator=g), -1)[..., 0]
    lp0 = (lmu + 0.4 * torch.randn(B, T, generator=g)).clamp(max=-1e-3)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    for cap in (math.inf, 1.5):
        grads = []
        for form in ("ppo_clip", "is"):
            m = replace(PRESETS["grpo-clip-higher"], loss_form=form, ratio_cap=cap)
            lp = lp0.clone().requires_grad_(True)
            loss, met = policy_loss(m, lp, lmu, adv, mask)
            loss.backward()
            grads.append(lp.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
        assert met["masked_frac"] > 0  # the test crosses the clip boundary


def test_drpo_weight_zero_at_dppo_boundary():
    """DRPO's gradient weight 1 − sign(Â(r−1))·|π−μ|/δ vanishes where DPPO-Binary-TV's mask switches (δ = 0.15)."""
    m = replace(PRESETS["drpo"], aggregation="sum")
    lmu = torch.tensor([[math.log(0.5)]])
    lp = torch.tensor([[math.log(0.65)]], requires_grad=True)
    loss, _ = policy_loss(m, lp, lmu, torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert abs(lp.grad.item()) < 1e-6


def test_trm_drops_whole_sequences():
    m = replace(PRESETS["trm"], aggregation="sum")
    lmu = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    lp = torch.log(torch.tensor([[0.52, 0.48, 0.9], [0.52, 0.48, 0.51]])).requires_grad_(True)
    loss, met = policy_loss(m, lp, lmu, torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss.backward()
    assert lp.grad[0].abs().max().item() == 0.0  # Bin-KL(0.5→0.9) = 0.51 > 0.05: the whole sequence is dropped
    assert (lp.grad[1] != 0).all()
    assert met["seq_masked_frac"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(loss, m, "token-mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(loss, m, "seq-mean-token-mean").item() == pytest.approx(((1 + 2) / 2 + 4) / 2)
    assert aggregate(loss, m, "seq-mean-token-sum-norm").item() == pytest.approx((1 + 2 + 4) / (2 * 3))
    assert aggregate(loss, m, "seq-mean-token-sum-norm", max_len_norm=10).item() == pytest.approx(7 / 20)
    assert aggregate(loss, m, "sum").item() == pytest.approx(7.0)
    m2 = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)  # an empty sequence is not averaged in
    assert aggregate(loss, m2, "seq-mean-token-mean").item() == pytest.approx(1.5)


def test_aggregation_weights_by_hand():
    """loss = Σ w·ℓ for every mode: w = m/den, and m/(n_b·den) for seq-mean-token-mean."""
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    w = aggregation_weights(m, "seq-mean-token-mean")
    torch.testing.assert_close(w, torch.tensor([[1 / 4, 1 / 4, 0], [1 / 2, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(aggregation_weights(m, "token-mean"), m.float() / 3)
    torch.testing.assert_close(aggregation_weights(m, "seq-mean-token-sum-norm", max_len_norm=10), m.float() / 30)
    torch.testing.assert_close(aggregation_weights(m, "sum", denominator=4.0), m.float() / 4)
    loss = torch.randn(3, 3, dtype=torch.float64)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"):
        assert (loss * aggregation_weights(m, mode, dtype=torch.float64)).sum().item() == pytest.approx(
            aggregate(loss, m, mode).item(), rel=1e-15)


@pytest.mark.parametrize("name", ["dppo-topk-kl", "icepop", "vaco", "ipo-kl", "drpo"])
def test_token_loss_is_elementwise(name):
    """ℓ_t on the flattened tokens equals ℓ on [B, T], and ∂(Σ ℓ)/∂x_t depends on token t alone: what the fused path
    relies on."""
    g = torch.Generator().manual_seed(5)
    B, T, K = 4, 6, 3
    m = PRESETS[name]
    lmu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    lp = torch.minimum(lmu + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64), torch.tensor(-1e-3))
    old = torch.minimum(lmu + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64), torch.tensor(-1e-3))
    top_mu = torch.log(torch.rand(B, T, K, generator=g, dtype=torch.float64) * 0.05 + 0.01)
    resp = torch.ones(B, T, dtype=torch.bool)
    ctx = token_context(m, lmu, torch.randn(B, generator=g, dtype=torch.float64), old, top_mu,
                        torch.zeros(B, T, dtype=torch.bool), torch.float64)
    ctx = ctx._replace(logp_at_rollout_topk=(top_mu + 0.2).float())
    ctx = ctx._replace(seq_keep=sequence_gate(m, lp, ctx, old, resp)[0])
    x = lp.clone().requires_grad_(True)
    full = token_loss(m, x, ctx).loss
    (gfull,) = torch.autograd.grad(full.sum(), x)
    flat_ctx = type(ctx)(*(f.reshape(B * T, *f.shape[2:]) if f is not None else None for f in ctx))
    xf = lp.reshape(-1).clone().requires_grad_(True)
    flat = token_loss(m, xf, flat_ctx).loss
    (gflat,) = torch.autograd.grad(flat.sum(), xf)
    torch.testing.assert_close(flat, full.detach().reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(gflat, gfull.reshape(-1), rtol=0, atol=0)
    jac = torch.autograd.functional.jacobian(lambda y: token_loss(m, y, flat_ctx).loss, lp.reshape(-1))
    assert torch.count_nonzero(jac - torch.diag(torch.diagonal(jac))) == 0


def test_aggregation_denominators_by_hand():
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregation_denominator(m, "token-mean").item() == 3.0
    assert aggregation_denominator(m, "seq-mean-token-mean").item() == 2.0  # the empty row is not counted
    assert aggregation_denominator(m, "seq-mean-token-sum-norm").item() == 3 * 3
    assert aggregation_denominator(m, "seq-mean-token-sum-norm", max_len_norm=10).item() == 30.0
    assert aggregation_denominator(m, "sum").item() == 1.0
    assert aggregation_denominator(torch.zeros(2, 3, dtype=torch.bool), "token-mean").item() == 1.0  # never 0
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregation_denominator(m, "mean")


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum"])
@pytest.mark.parametrize("preset", ["dppo-binary-tv", "grpo", "cispo", "drpo", "trm", "dppo-topk-kl", "ipo-kl",
                                    "icepop", "vaco"])
def test_micro_batches_with_the_minibatch_denominator_sum_to_the_minibatch_gradient(aggregation, preset):
    """Gradient accumulation is exact: Σ over micro-batches of ∇ policy_loss(micro, denominator=D(mini)) equals
    ∇ policy_loss(mini) (fp64, to rounding), for uneven response lengths, an empty response, every aggregation. The
    old |micro|/|mini| weighting of each micro-batch's own mean is not, for the two means (checked too)."""
    g = torch.Generator().manual_seed(3)
    B, T, K = 8, 7, 4
    method = replace(PRESETS[preset], aggregation=aggregation)
    lmu = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    lp0 = lmu + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lp0 = torch.minimum(lp0, torch.full_like(lp0, -1e-3))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lens = torch.tensor([7, 1, 3, 0, 5, 2, 6, 4])
    mask = torch.arange(T)[None, :] < lens[:, None]
    topk = {}
    if method.estimator.startswith("topk"):
        top_mu = torch.log(torch.rand(B, T, K, generator=g, dtype=torch.float64) * 0.05 + 0.01)
        topk = dict(logp_at_rollout_topk=top_mu + 0.1 * torch.randn(B, T, K, generator=g, dtype=torch.float64),
                    rollout_topk_logp=top_mu, sampled_in_topk=torch.zeros(B, T, dtype=torch.bool))

    if method.needs_old_logp:
        old = torch.minimum(lmu + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64),
                            torch.full_like(lmu, -1e-3))
        topk["old_logp"] = old

    def grad(rows, **kw):
        lp = lp0.clone().requires_grad_()
        sub = {k: v[rows] for k, v in topk.items()}
        loss, _ = policy_loss(method, lp[rows], lmu[rows], adv[rows], mask[rows], **sub, **kw)
        loss.backward()
        return lp.grad, loss.detach()

    full_g, full_loss = grad(torch.arange(B))
    den = aggregation_denominator(mask, aggregation)
    parts = [grad(rows, denominator=den) for rows in torch.arange(B).chunk(4)]
    torch.testing.assert_close(sum(p[0] for p in parts), full_g, rtol=0, atol=1e-12)
    torch.testing.assert_close(sum(p[1] for p in parts), full_loss, rtol=0, atol=1e-12)
    if aggregation in ("token-mean", "seq-mean-token-mean") and full_g.abs().max() > 0:
        weighted = sum(grad(rows)[0] * (len(rows) / B) for rows in torch.arange(B).chunk(4))
        assert (weighted - full_g).abs().max() > 1e-6  # what the denominator fixes


def test_bad_denominator_is_named():
    lp = torch.log(torch.full((2, 3), 0.5))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="denominator must be a finite number > 0"):
            policy_loss("grpo", lp, lp, torch.ones(2), torch.ones(2, 3, dtype=torch.bool), denominator=bad)


def test_metrics_by_hand():
    # three tokens: μ = 0.5 each; π = 0.8 (Â>0, rises, TV .3 → masked +), 0.1 (Â<0, falls, TV .4 → masked −), 0.55
    lmu = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    lp = torch.log(torch.tensor([[0.8, 0.1, 0.55, 0.9]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    resp = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)  # last token is padding and must not count
    _, met = policy_loss("dppo-binary-tv", lp, lmu, adv, resp)
    assert set(met) == set(METRIC_KEYS)
    assert met["tokens"] == 3
    assert met["abs_diff_mean"] == pytest.approx((0.3 + 0.4 + 0.05) / 3, rel=1e-5)
    assert met["abs_diff_max"] == pytest.approx(0.4, rel=1e-5)
    assert met["abs_diff_min"] == pytest.approx(0.05, rel=1e-4)
    assert met["abs_dlogp_mean"] == pytest.approx((math.log(1.6) + math.log(5) + math.log(1.1)) / 3, rel=1e-5)
    assert met["diff_max"] == pytest.approx(0.3, rel=1e-5)
    assert met["diff_min"] == pytest.approx(-0.4, rel=1e-5)
    assert met["masked_frac"] == pytest.approx(2 / 3)
    assert met["masked_frac_pos"] == pytest.approx(1 / 3)
    assert met["masked_frac_neg"] == pytest.approx(1 / 3)
    assert met["ratio_max"] == pytest.approx(1.6, rel=1e-5)
    assert met["ratio_mean"] == pytest.approx((1.6 + 0.2 + 1.1) / 3, rel=1e-5)
    assert met["div_mean"] == pytest.approx(met["abs_diff_mean"], rel=1e-6)
    assert met["capped_frac"] == 0.0 and met["seq_masked_frac"] == 0.0
    # loss: only token 3 kept, −Â·r = −1.1, seq-mean-token-sum-norm over B·T = 4
    assert met["loss"] == pytest.approx(-1.1 / 4, rel=1e-5)
    _, met = policy_loss(replace(PRESETS["cispo"], ratio_cap=1.5), lp, lmu, adv, resp)
    assert met["capped_frac"] == pytest.approx(1 / 3)


def _gc_batch():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 4
    lmu = torch.log_softmax(torch.randn(B, T, 7, generator=g, dtype=torch.float64), -1)[..., 0]
    lp = (lmu + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-2)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    return lp, lmu, adv, mask


@pytest.mark.parametrize("name", ["grpo", "grpo-clip-higher", "drpo"])
def test_gradcheck_float64_differentiable_forms(name):
    """The PPO-clip form (C = ∞, rollout anchor) and DRPO have no stop-gradient: autograd must match finite
    differences of the loss value itself."""
    lp, lmu, adv, mask = _gc_batch()
    m = replace(PRESETS[name], aggregation="token-mean")
    f = lambda x: policy_loss(m, x, lmu, adv, mask)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),), eps=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", ["dppo-binary-tv", "dppo-binary-kl", "pg-is", "minimal-negative-mask", "relax-both"])
def test_is_form_gradient_is_that_of_the_masked_surrogate(name):
    """Eq. 23 with C = ∞ is the gradient of the masked surrogate Σ M·r·Â (Eq. 12) with M held fixed: autograd of
    policy_loss vs central finite differences of that surrogate, float64."""
    lp, lmu, adv, mask = _gc_batch()
    m = replace(PRESETS[name], aggregation="token-mean")
    x = lp.clone().requires_grad_(True)
    policy_loss(m, x, lmu, adv, mask)[0].backward()
    # M from the same rule, independently: the reference of this file
    M = torch.tensor([[0.0 if ref_blocked(m, math.exp(a), math.exp(b), c) else 1.0
                       for a, b in zip(row_p.tolist(), row_m.tolist())]
                      for row_p, row_m, c in zip(lp, lmu, adv.tolist())], dtype=torch.float64)

    def surrogate(y):
        return -(M * torch.exp(y - lmu) * adv[:, None] * mask).sum() / mask.sum()

    num = torch.zeros_like(lp)
    h = 1e-6
    for idx in itertools.product(range(lp.shape[0]), range(lp.shape[1])):
        e = torch.zeros_like(lp)
        e[idx] = h
        num[idx] = (surrogate(lp + e) - surrogate(lp - e)) / (2 * h)
    torch.testing.assert_close(x.grad, num, rtol=1e-7, atol=1e-9)


def test_all_masked_batch_is_zero_finite_and_silent():
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    for name in PRESETS:
        if PRESETS[name].needs_topk or PRESETS[name].needs_old_logp:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, met = policy_loss(name, lp, torch.full((2, 3), -1.2), torch.tensor([1.0, -1.0]),
                                    torch.zeros(2, 3, dtype=torch.bool))
            loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(lp.grad).all() and (lp.grad == 0).all()
        assert all(math.isfinite(v) for v in met.values()), name
        lp.grad = None


def test_bf16_logp_same_as_fp32_of_same_values():
    g = torch.Generator().manual_seed(4)
    lmu = torch.log_softmax(torch.randn(4, 5, 20, generator=g), -1)[..., 0].bfloat16()
    lp = (lmu.float() + 0.3 * torch.randn(4, 5, generator=g)).clamp(max=0).bfloat16()
    adv, mask = torch.randn(4, generator=g), torch.ones(4, 5)
    for name in ("dppo-binary-tv", "dppo-binary-kl", "grpo-clip-higher"):
        a = lp.clone().requires_grad_(True)
        b = lp.float().requires_grad_(True)
        la, ma = policy_loss(name, a, lmu, adv, mask)
        lb, mb = policy_loss(name, b, lmu.float(), adv, mask)
        assert la.dtype == torch.float32
        assert la.item() == lb.item() and ma == mb
        la.backward()
        lb.backward()
        torch.testing.assert_close(a.grad.float(), b.grad.bfloat16().float())


# ---------------------------------------------------------------------------------------------------------------
def _ok():
    return dict(logp=torch.full((2, 3), -1.0), rollout_logp=torch.full((2, 3), -1.1), advantages=torch.ones(2),
                response_mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "change,method,exc,match",
    [
        (dict(advantages=torch.ones(3)), "pg-is", ValueError, r"advantages has shape \(3,\)"),
        (dict(advantages=torch.ones(2, 1)), "pg-is", ValueError, "advantages has shape"),
        (dict(rollout_logp=torch.full((2, 4), -1.0)), "pg-is", ValueError, "rollout_logp has shape"),
        (dict(response_mask=torch.ones(2)), "pg-is", ValueError, "response_mask has shape"),
        (dict(response_mask=torch.full((2, 3), 2.0)), "pg-is", ValueError, "0 and 1"),
        (dict(logp=torch.full((2, 3), -1, dtype=torch.long)), "pg-is", TypeError, "logp must be a floating"),
        (dict(advantages=torch.ones(2, dtype=torch.long)), "pg-is", TypeError, "advantages must be a floating"),
        (dict(logp=torch.tensor([[-1.0, float("nan"), -1.0]] * 2)), "pg-is", ValueError, "logp contains NaN"),
        (dict(rollout_logp=torch.full((2, 3), float("inf"))), "pg-is", ValueError, "rollout_logp contains"),
        (dict(advantages=torch.tensor([1.0, float("inf")])), "pg-is", ValueError, "advantages contains"),
        (dict(logp=torch.full((2, 3), 0.3)), "pg-is", ValueError, "logp holds log-probabilities > 0"),
        (dict(logp=torch.full((2, 3, 1), -1.0)), "pg-is", ValueError, r"logp must be \[B, T\]"),
        (dict(logp=torch.zeros(0, 3), rollout_logp=torch.zeros(0, 3), advantages=torch.ones(0),
              response_mask=torch.ones(0, 3)), "pg-is", ValueError, "empty batch"),
        ({}, "dppo-topk-tv", ValueError, "needs logp_at_rollout_topk, rollout_topk_logp and sampled_in_topk"),
        ({}, "minirl", ValueError, "needs old_logp"),
        (dict(old_logp=torch.full((2, 2), -1.0)), "minirl", ValueError, "old_logp has shape"),
        ({}, "no-such-method", ValueError, "unknown method 'no-such-method'; choose one of"),
        (dict(logp_at_rollout_topk=torch.full((2, 3, 4), -2.0), rollout_topk_logp=torch.full((2, 3, 5), -2.0),
              sampled_in_topk=torch.zeros(2, 3, dtype=torch.bool)), "dppo-topk-tv", ValueError, "same K"),
        (dict(logp_at_rollout_topk=torch.full((2, 3, 4), -2.0)), "pg-is", ValueError, "pass all three"),
    ],
)
def test_bad_input(change, method, exc, match):
    kw = _ok()
    kw.update(change)
    args = [kw.pop(k) for k in ("logp", "rollout_logp", "advantages", "response_mask")]
    with pytest.raises(exc, match=match):
        policy_loss(method, *args, **kw)


def test_token_weights_replace_the_aggregation():
    """policy_loss(token_weights=w) = Σ_t w_t·ℓ_t with ℓ_t from single-token calls (aggregation 'sum'), for a preset
    whose penalty does not scale with Â (ipo-kl): a host trainer's own per-token weights, not Â rescaling."""
    g = torch.Generator().manual_seed(5)
    lp = (torch.rand(3, 4, generator=g, dtype=torch.float64) * -2).requires_grad_()
    lmu = torch.rand(3, 4, generator=g, dtype=torch.float64) * -2
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    w = torch.rand(3, 4, generator=g, dtype=torch.float64)
    loss, _ = policy_loss("ipo-kl", lp, lmu, adv, mask, token_weights=w)
    unit = replace(PRESETS["ipo-kl"], aggregation="sum")
    want = sum(w[b, t] * policy_loss(unit, lp[b:b + 1, t:t + 1], lmu[b:b + 1, t:t + 1], adv[b:b + 1],
                                     mask[b:b + 1, t:t + 1])[0] for b in range(3) for t in range(4) if mask[b, t])
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    g1, = torch.autograd.grad(loss, lp)
    g2, = torch.autograd.grad(want, lp)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="token_weights or denominator"):
        policy_loss("ipo-kl", lp, lmu, adv, mask, token_weights=w, denominator=2.0)


def test_deprecated_topk_logp_keyword_still_works_and_warns():
    """policy_loss(topk_logp=) was log π at the *rollout's* top-K ids, not TokenStats.topk_logp (π's own top-K): the
    keyword is now logp_at_rollout_topk; the old name warns and gives the same loss."""
    g = torch.Generator().manual_seed(2)
    lmu = torch.log(torch.rand(2, 3, generator=g) * 0.5 + 0.2)
    lp = torch.log(torch.rand(2, 3, generator=g) * 0.5 + 0.2)
    top_mu, top_pi = torch.log(torch.full((2, 3, 2), 0.1)), torch.log(torch.full((2, 3, 2), 0.12))
    args = ("dppo-topk-tv", lp, lmu, torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool))
    kw = dict(rollout_topk_logp=top_mu, sampled_in_topk=torch.zeros(2, 3, dtype=torch.bool))
    new = policy_loss(*args, logp_at_rollout_topk=top_pi, **kw)
    with pytest.warns(DeprecationWarning, match="logp_at_rollout_topk"):
        old = policy_loss(*args, topk_logp=top_pi, **kw)
    assert torch.equal(new[0], old[0]) and new[1] == old[1]
    with pytest.raises(ValueError, match="not also its deprecated name"):
        policy_loss(*args, topk_logp=top_pi, logp_at_rollout_topk=top_pi, **kw)
