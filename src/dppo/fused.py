"""The policy loss straight from the final hidden states: statistics, loss, metrics and ∂/∂(h, W, b) in one tiled pass.

For every method whose gate is known before the update (all presets but TRM), the loss is a sum of per-token terms
(:mod:`dppo.token_loss`, :func:`dppo.aggregation.aggregation_weights`),

    L = Σ_t w_t · ℓ_t(x_t),   x_t = log π_θ(a_t) = z_t[a_t] − logsumexp(z_t),   z_t = (h_t·Wᵀ + b) / τ,

and ℓ_t depends on the policy only through x_t (its mask, cap, behaviour weight and gate are detached and need
only token t's own statistics: x_t, and log π_θ at the rollout's top-K ids, which sit in the same logits row). So

    ∂L/∂z_t = c_t · (onehot(a_t) − softmax(z_t)),   c_t = w_t · ∂ℓ_t/∂x_t,

and ∂L/∂(h·Wᵀ + b) is that divided by τ. The forward walks over token tiles ([chunk, V] fp32 logits at a time,
:mod:`dppo._tiles`); per tile it computes x_t, the top-K log-probs and the entropy, then c_t (autograd of ℓ on the
tile's [chunk] vector x: O(chunk) work), then dz in place of the tile's softmax buffer and

    GEMM 1   z   = h_tile · Wᵀ            [chunk, V]    (the logits; bf16 GEMM, fp32 softmax for bf16 models)
    GEMM 2   dh  = dz · W                 [chunk, H]    written once per token
    GEMM 3   dW += dzᵀ · h_tile           [V, H]        accumulated over token tiles, in W's dtype (as Liger's
                                                        fused linear cross-entropy does by default)

The backward only scales the saved (dh, dW, db) by the incoming gradient: 3 GEMMs of N·V·H per call against
:func:`dppo.token_stats`'s 4 (it recomputes the logits in the backward) and the naive path's 3, with no [N, V]
tensor kept and none recomputed. Padding tokens (response_mask = 0) are skipped entirely.

On a CUDA device (fp32/bf16/fp16) the per-tile statistics and dz are two Triton kernels (:mod:`dppo._triton_tiles`:
one read of the tile as the GEMM wrote it for log-sum-exp, x_t, the top-K log-probs and the entropy; one read and
write for dz, in place, in the GEMM dtype); elsewhere, or with ``DPPO_TILE_KERNEL=torch``, the PyTorch tile path
(:func:`dppo._tiles._tile_stats`), which is the fallback and the reference.

Methods with a sequence gate on the *current* policy (TRM: max over the sequence of D(μ‖π_θ); VESPO's φ(w); the
off-policy sequence mask's mean log(μ/π_θ)) cannot know c_t
before the whole sequence's x is known; for them the entry point falls back to ``token_stats`` + ``policy_loss``
(a second pass over the logits in the backward), which gives the same loss, metrics and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dppo._checks import check_policy_batch
from dppo._tiles import _acc_dtype, _check_common, _check_head, _check_ids, _tile_stats, _Workspace, default_chunk_size
from dppo._triton_tiles import tile_dz_, tile_stats, use_triton
from dppo.aggregation import aggregation_weights, check_denominator
from dppo.loss import policy_loss
from dppo.methods import Method, get_method
from dppo.metrics import loss_metrics
from dppo.token_loss import TokenContext, sequence_gate, token_context, token_loss
from dppo.token_stats import token_stats

__all__ = ["policy_loss_from_hidden"]

_PAD_LOGP = -0.6931471805599453  # log 0.5


class _Plan:
    """What the fused forward needs besides h, W, b (plain attributes, not autograd inputs), and what it leaves for
    the metrics (``lp``, ``terms``, ``entropy``)."""

    def __init__(self, m: Method, tgt: Tensor, gids: Tensor | None, ctx: TokenContext, w: Tensor, rows: Tensor | None,
                 temperature: float, chunk: int, want_entropy: bool, need: tuple[bool, bool, bool]):
        self.m, self.ctx, self.w, self.rows = m, ctx, w, rows  # ctx, w: [B, T]; rows: response rows of B·T
        self.temperature, self.chunk, self.want_entropy, self.need = temperature, chunk, want_entropy, need
        flat = slice(None) if rows is None else rows

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(w.numel(), *t.shape[2:])[flat]

        # the per-token inputs of the response rows, flattened: what each tile reads
        self.tgt, self.gids, self.w_rows = pick(tgt), pick(gids), pick(w)
        self.ctx_rows = TokenContext(*(pick(f) for f in ctx))
        self.lp = self.terms = self.entropy = None


def _slopes(m: Method, x: Tensor, ctx: TokenContext, w: Tensor) -> Tensor:
    """c_t = w_t · ∂ℓ_t/∂x_t for a tile of tokens ([c] tensors; ℓ_t depends on x_t alone, so one gradient of the sum
    gives every token's own derivative)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (c,) = torch.autograd.grad((token_loss(m, x, ctx).loss * w).sum(), x)
    return c


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        m, tgt, gids, tc, w = plan.m, plan.tgt, plan.gids, plan.ctx_rows, plan.w_rows
        need_h, need_w, need_b = plan.need
        n_all, v = hidden.shape[0], weight.shape[0]
        h = hidden if plan.rows is None else hidden[plan.rows]
        n = h.shape[0]
        acc = _acc_dtype(hidden.dtype)
        tau = plan.temperature
        kw = dict(dtype=acc, device=hidden.device)
        x, ent = torch.empty(n, **kw), torch.empty(n if plan.want_entropy else 0, **kw)
        gath = torch.empty(n, gids.shape[1] if gids is not None else 0, **kw)
        dh = torch.empty(n, hidden.shape[1], dtype=hidden.dtype, device=hidden.device) if need_h else None
        dw = torch.zeros_like(weight) if need_w and n == 0 else None
        db = torch.zeros(v, **kw) if need_b else None
        chunk = -(-n // -(-n // plan.chunk)) if n else plan.chunk  # same tile count, balanced sizes
        # Triton (dppo._triton_tiles): the tile stays in the GEMM's dtype, read once for the statistics and once
        # for dz, which overwrites it; PyTorch: an fp32 tile plus a scratch tile for exp (dppo._tiles._tile_stats)
        tri = use_triton(hidden.device, hidden.dtype)
        ws = (_Workspace(min(chunk, n) * v, hidden.dtype if tri else acc, hidden.dtype, hidden.device,
                         extra=0 if tri else 1) if n else None)
        for s0 in range(0, n, chunk):
            s1 = min(n, s0 + chunk)
            g = gids[s0:s1] if gids is not None else None
            if tri:
                z = ws.logits(h[s0:s1], weight, bias, 1.0)  # h·Wᵀ + b; the kernels scale by 1/τ
                xt, et, gt, lse = tile_stats(z, tau, tgt[s0:s1], g, plan.want_entropy)
            else:
                z = ws.logits(h[s0:s1], weight, bias, tau)
                _, xt, et, _, _, gt, e, s = _tile_stats(z, ws.scratch(z), tgt[s0:s1], g, 0, plan.want_entropy)
            x[s0:s1] = xt
            if plan.want_entropy:
                ent[s0:s1] = et
            if g is not None:
                gath[s0:s1] = gt
            if not any(plan.need):
                continue
            rows_tc = TokenContext(*(f[s0:s1] if f is not None else None for f in tc))
            if g is not None:
                rows_tc = rows_tc._replace(logp_at_rollout_topk=gt.float())
            coef = _slopes(m, xt, rows_tc, w[s0:s1]) / tau
            if tri:  # dz in the GEMM dtype, in place of the logits
                dzl = tile_dz_(z, tau, tgt[s0:s1], lse, coef)
                if need_b:
                    db += dzl.sum(0, dtype=db.dtype)
            else:
                # dz = c/τ·(onehot(a) − p), p = e/s: built in place of e, the tile's softmax numerator
                dz = e.mul_((-coef / s)[:, None])
                dz[torch.arange(s1 - s0, device=dz.device), tgt[s0:s1]] += coef
                if need_b:
                    db += dz.sum(0)
                dzl = ws.to_low(dz)
            if need_h:
                ws.grad_input(dzl, weight, dh[s0:s1])
            if need_w:
                first = dw is None
                dw = torch.empty_like(weight) if first else dw
                ws.grad_weight(dzl, h[s0:s1], dw, accumulate=not first)
        del ws
        # The loss value and the per-token terms on the whole [B, T] batch, computed exactly as policy_loss does
        # (O(N) work); padding positions get log 0.5 as a finite stand-in (their weight and metrics mask are 0, and a
        # finite log π keeps every term there finite whatever the rollout padded with).
        full = plan.ctx
        lp = torch.full_like(full.rollout_logp, _PAD_LOGP)
        lp.view(-1)[slice(None) if plan.rows is None else plan.rows] = x.to(lp.dtype)
        if gids is not None:
            topk = full.rollout_topk_logp.clone()
            topk.view(-1, topk.shape[-1])[slice(None) if plan.rows is None else plan.rows] = gath.float()
            full = full._replace(logp_at_rollout_topk=topk)
        terms = token_loss(m, lp, full)
        loss = (terms.loss * plan.w).sum()
        plan.ctx, plan.lp, plan.terms, plan.entropy = full, lp, terms, ent
        ctx.grads = (
            None if dh is None else _scatter_rows(dh, plan.rows, n_all),
            dw, None if db is None else db.to(bias.dtype),
        )
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        dh, dw, db = ctx.grads
        ctx.grads = None  # drop our reference so that autograd can take the tensors over instead of copying them
        if g_loss is None:
            return None, None, None, None
        if float(g_loss) != 1.0:
            for t in (dh, dw, db):
                if t is not None:
                    t.mul_(g_loss)
        return dh, dw, db, None


def _scatter_rows(x: Tensor, rows: Tensor | None, n: int) -> Tensor:
    if rows is None:
        return x
    out = x.new_zeros(n, x.shape[1])
    out[rows] = x
    return out


def policy_loss_from_hidden(
    method: Method | str,
    hidden: Tensor,
    weight: Tensor,
    response_ids: Tensor,
    rollout_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    old_logp: Tensor | None = None,
    rollout_topk_ids: Tensor | None = None,
    rollout_topk_logp: Tensor | None = None,
    denominator: Tensor | float | None = None,
    entropy: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``policy_loss`` of ``method`` computed from the lm-head's input, fused with the log-prob statistics.

    Same loss, metrics and gradients (w.r.t. ``hidden``, ``weight``, ``bias``) as

        st = token_stats(hidden, weight, response_ids, bias=bias, temperature=temperature,
                         gather_ids=rollout_topk_ids if method.needs_topk else None)
        policy_loss(method, st.logp, rollout_logp, advantages, response_mask, old_logp=old_logp,
                    logp_at_rollout_topk=st.gathered_logp, rollout_topk_logp=rollout_topk_logp,
                    sampled_in_topk=(rollout_topk_ids == response_ids[..., None]).any(-1), denominator=denominator)

    in 3 GEMMs of N·V·H instead of 4 (module docstring); methods with ``single_pass`` False (TRM, VESPO,
    offpolicy-seq-mask) run exactly that.

    Args:
        method: a :class:`dppo.Method` or a preset name.
        hidden: [B, T, H] final hidden states (after the final norm) at the positions that predict the response
            tokens (for ``input_ids = [prompt | response]`` of length P+T: positions P−1 … P+T−2); fp32/bf16/fp16/fp64.
        weight: [V, H] lm-head weight (same dtype/device); bias: optional [V]. Logits = (h·Wᵀ + b)/``temperature``.
        response_ids: [B, T] the sampled tokens a_t (any id where the response mask is 0).
        rollout_logp, advantages ([B] or [B, T]), response_mask, old_logp, denominator: as in :func:`policy_loss`.
        rollout_topk_ids, rollout_topk_logp: [B, T, K] the rollout's top-K ids and their log μ; needed by top-K
            estimators (whether a_t is among the ids is derived from them).
        entropy: also report the mean entropy of π_θ(·|s_t) over the response tokens (metric ``entropy``; one
            multiply-add pass per tile; no gradient).
        chunk_size: tokens per tile; default :func:`dppo._tiles.default_chunk_size` (128 MB of fp32 logits; 1 GB
            on a CUDA device).
    Environment: ``DPPO_TILE_KERNEL`` = ``auto`` (default: Triton kernels on CUDA when triton imports),
        ``torch`` or ``triton`` (:mod:`dppo._triton_tiles`).
    Returns:
        (loss, metrics) as :func:`dppo.policy_loss` (+ ``entropy``). ``loss.backward()`` scales the gradients the
        forward already computed. Memory: the gradients dW (W's dtype) and dh, one tile of logits (fp32, plus a
        copy in the GEMM dtype), O(N·K) statistics; never O(N·V). For bf16 weights dW is accumulated in bf16 over
        the ⌈N/chunk⌉ token tiles (one rounding per tile, as Liger does by default).
    """
    m = get_method(method)
    hidden, weight, bias = _check_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] (batch, response tokens, hidden size), got {tuple(hidden.shape)}")
    b_, t_, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    temperature, _ = _check_common(temperature, 0, chunk_size, v)
    tgt = _check_ids("response_ids", response_ids, (b_, t_), v, hidden.device)
    if not isinstance(rollout_logp, Tensor) or tuple(rollout_logp.shape) != (b_, t_):
        shape = tuple(rollout_logp.shape) if isinstance(rollout_logp, Tensor) else type(rollout_logp).__name__
        raise ValueError(f"rollout_logp must be [B, T] = {(b_, t_)} to match hidden [B, T, H], got {shape}")
    gids = sampled_in = None
    if m.needs_topk and (rollout_topk_ids is None or rollout_topk_logp is None):
        raise ValueError(f"method {m.name!r} uses a top-K estimator and needs rollout_topk_ids and rollout_topk_logp "
                         "(the rollout's top-K ids and their log μ, method.topk of them)")
    if (rollout_topk_ids is None) != (rollout_topk_logp is None):
        raise ValueError("pass both rollout_topk_ids and rollout_topk_logp, or neither")
    if m.needs_topk:
        k = rollout_topk_ids.shape[-1] if isinstance(rollout_topk_ids, Tensor) else -1
        gids = _check_ids("rollout_topk_ids", rollout_topk_ids, (b_, t_, k), v, hidden.device)
        sampled_in = (gids == tgt[..., None]).any(-1)
    check_policy_batch(m, rollout_logp, rollout_logp, advantages, response_mask, old_logp,
                       rollout_topk_logp if m.needs_topk else None, rollout_topk_logp if m.needs_topk else None,
                       sampled_in, ref="rollout_logp")
    check_denominator(denominator)
    resp = response_mask.bool()

    if not m.single_pass:  # a gate on the current policy's whole sequence: two passes (module docstring)
        st = token_stats(hidden, weight, tgt, bias=bias, temperature=temperature, gather_ids=gids, entropy=entropy,
                         chunk_size=chunk_size)
        loss, met = policy_loss(m, st.logp, rollout_logp, advantages, response_mask, old_logp=old_logp,
                                logp_at_rollout_topk=st.gathered_logp,
                                rollout_topk_logp=rollout_topk_logp if gids is not None
                                else None, sampled_in_topk=sampled_in, denominator=denominator)
        if entropy:
            met["entropy"] = _mean(st.entropy.detach(), resp)
        return loss, met

    dt = _acc_dtype(hidden.dtype)
    tc = token_context(m, rollout_logp, advantages, old_logp, rollout_topk_logp if gids is not None else None,
                       sampled_in, dt)
    seq_keep, seq_over = sequence_gate(m, None, tc, old_logp, resp)
    tc = tc._replace(seq_keep=seq_keep)
    w = aggregation_weights(resp, m.aggregation, m.max_len_norm, denominator, dt)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    rows = None if bool(resp.all()) else resp.reshape(-1).nonzero().squeeze(1)
    plan = _Plan(m, tgt, gids, tc, w, rows, temperature, chunk_size or default_chunk_size(v, hidden.dtype, hidden.device),
                 bool(entropy), need)
    h2 = hidden.reshape(b_ * t_, hidden.shape[-1])
    loss = _FusedLoss.apply(h2, weight, bias, plan) if any(need) else _FusedLoss.forward(_NoCtx(), h2, weight, bias,
                                                                                          plan)
    met = loss_metrics(m, loss, plan.lp, plan.ctx, plan.terms, seq_over, resp)
    if entropy:
        met["entropy"] = float(plan.entropy.mean()) if plan.entropy.numel() else 0.0
    return loss, met


class _NoCtx:
    """Stands in for autograd's ctx when no gradient is wanted (the forward then skips the gradient GEMMs)."""

    def set_materialize_grads(self, _: bool) -> None:
        pass


def _mean(x: Tensor, resp: Tensor) -> float:
    return float((x.float() * resp).sum() / resp.sum().clamp(min=1))
