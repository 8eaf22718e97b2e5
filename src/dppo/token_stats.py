"""Per-token softmax statistics at vocabulary scale, computed from hidden states without materialising the logits.

Every loss in dppo needs, per response token t with final hidden state h_t and lm-head weight W (bias b):

    z_t      = (h_t · Wᵀ + b) / τ                          logits at temperature τ          [V]
    lse_t    = log Σ_v exp z_t[v]                          computed in fp32 (fp64 for fp64 inputs)
    logp_t   = z_t[a_t] − lse_t                            log π(a_t | s_t)                  (differentiable)
    H_t      = −Σ_v p_t[v] log p_t[v],  p_t = softmax(z_t)  entropy                           (differentiable)
    topk_t   = the K largest (v, z_t[v] − lse_t)            rollout side of Top-K DPPO        (no gradient)
    gath_t   = z_t[g_t,j] − lse_t  at caller-given ids g_t  trainer side of Top-K DPPO        (differentiable)

Doing this with a materialised [N, V] logit tensor and a full fp32 ``log_softmax`` costs several N·V·4 bytes
(at V = 151,936 and N = 16k, ~10 GB per copy). Here the forward pass walks over *token* tiles of ``chunk_size`` rows
([chunk, V] logits at a time) and keeps only O(N) results (lse, entropy, the outputs); the backward pass recomputes
the logits in *vocabulary* tiles of the same number of elements ([N, V_tile], V_tile = chunk·V/N) from the saved
lse, so no O(N·V) tensor exists in either direction. Tiling the backward over the vocabulary makes each slice of
∂W = ∂zᵀ·h a single GEMM over all N tokens, written once: no cross-tile accumulation of a [V, H] gradient (which
would cost a [V, H] pass per tile and, for bf16 weights, a bf16 rounding per tile).

The price is one extra GEMM (the recompute) over the naive path's three; docs/benchmarks.md measures what that
costs against the memory traffic the naive path spends on its [N, V] fp32 copies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dppo._tiles import (
    DEFAULT_TILE_BYTES,
    _acc_dtype,
    _check_common,
    _check_head,
    _flat_ids,
    _float,
    _tile_stats,
    _Workspace,
    default_chunk_size,
)

__all__ = ["TokenStats", "token_stats", "token_stats_from_logits", "DEFAULT_TILE_BYTES", "default_chunk_size"]

class TokenStats(NamedTuple):
    """Per-token statistics; leading dims ``[...]`` are those of ``target_ids``. Float outputs are fp32 (fp64 for
    fp64 inputs). A field is ``None`` when not requested (``topk=0``, ``gather_ids=None``, ``entropy=False``)."""

    logp: Tensor  # [...]      log π(target)                       differentiable
    entropy: Tensor | None  # [...]      −Σ p log p                          differentiable
    topk_ids: Tensor | None  # [..., K]   int64, largest first             no gradient
    topk_logp: Tensor | None  # [..., K]   log π at topk_ids              no gradient
    gathered_logp: Tensor | None  # [..., K'] log π at gather_ids          differentiable


# ----------------------------------------------------------------------------------------------------------------
# Tile kernels shared by the hidden-state and the logits entry points.
# ----------------------------------------------------------------------------------------------------------------


def _tile_grad(
    z: Tensor, lse: Tensor, ent: Tensor | None, neg_a: Tensor, g_ent: Tensor | None, p_buf: Tensor | None
) -> Tensor:
    """Dense part of ∂loss/∂z for one tile, in place in ``z`` (temperature-scaled logits, accumulation dtype).

    With log p = z − lse and per-row upstream gradients (already multiplied by 1/τ):
      ∂logp[a]/∂z = e_a − p,   ∂gath[g]/∂z = e_g − p,   ∂H/∂z = −p ⊙ (log p + H),
    so ∂z = sparse one-hots − p ⊙ (a + g_H·(log p + H)) with a = g_logp + Σ_j g_gath[j] (rows). The one-hot part is
    added by the caller. ``neg_a`` is −a, [rows, 1]; ``g_ent`` and ``ent`` are [rows, 1] or None; ``p_buf`` is a
    scratch tile, needed only with ``g_ent``.
    """
    logp = z.sub_(lse)
    if g_ent is None:
        return logp.exp_().mul_(neg_a)
    p = torch.exp(logp, out=p_buf)
    # −p·(a + g_H·(log p + H)) = p·(−a − g_H·(log p + H)), built in the z buffer.
    return logp.add_(ent).mul_(-g_ent).add_(neg_a).mul_(p)


def _upstream(
    g_logp: Tensor | None, g_gath: Tensor | None, g_ent: Tensor | None, tgt: Tensor, gids: Tensor | None,
    n: int, acc: torch.dtype, inv_t: float,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Per-row −a (scaled by 1/τ), g_H (scaled) and the sparse one-hot entries (rows, ids, values) sorted by id."""
    device = tgt.device
    a = torch.zeros(n, dtype=acc, device=device)
    rows, ids, vals = [], [], []
    if g_logp is not None:
        g = g_logp.to(acc)
        a += g
        rows.append(torch.arange(n, device=device))
        ids.append(tgt)
        vals.append(g)
    if g_gath is not None and gids is not None and gids.shape[-1] > 0:
        g = g_gath.to(acc)
        a += g.sum(-1)
        rows.append(torch.arange(n, device=device).repeat_interleave(gids.shape[-1]))
        ids.append(gids.reshape(-1))
        vals.append(g.reshape(-1))
    neg_a = (a * -inv_t)[:, None]
    g_ent_s = (g_ent.to(acc) * inv_t)[:, None] if g_ent is not None else None
    if ids:
        rows_t, ids_t, vals_t = torch.cat(rows), torch.cat(ids), torch.cat(vals) * inv_t
        order = ids_t.argsort()
        rows_t, ids_t, vals_t = rows_t[order], ids_t[order], vals_t[order]
    else:
        rows_t = ids_t = torch.zeros(0, dtype=torch.long, device=device)
        vals_t = torch.zeros(0, dtype=acc, device=device)
    return neg_a, g_ent_s, rows_t, ids_t, vals_t


def _forward_tiles(n: int, chunk: int, tile_logits, tgt: Tensor, gids: Tensor | None, topk: int,
                   want_entropy: bool, ws: "_Workspace", acc: torch.dtype, device) -> tuple[Tensor, ...]:
    """Run :func:`_tile_stats` over token tiles [s0, s1) whose fp32 logits ``tile_logits(s0, s1)`` builds in ``ws``;
    returns (lse [n], logp [n], entropy [n or 0], topk_ids [n, K], topk_logp [n, K], gathered [n, K'])."""
    kw = dict(dtype=acc, device=device)
    lse, logp = torch.empty(n, **kw), torch.empty(n, **kw)
    ent = torch.empty(n if want_entropy else 0, **kw)
    topk_ids = torch.empty(n, topk, dtype=torch.long, device=device)
    topk_logp = torch.empty(n, topk, **kw)
    kg = gids.shape[-1] if gids is not None else 0
    gath = torch.empty(n, kg, **kw)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        z = tile_logits(s0, s1)
        out = _tile_stats(z, ws.scratch(z), tgt[s0:s1], gids[s0:s1] if gids is not None else None, topk, want_entropy)[:6]
        lse[s0:s1], logp[s0:s1] = out[0], out[1]
        if want_entropy:
            ent[s0:s1] = out[2]
        if topk:
            topk_ids[s0:s1], topk_logp[s0:s1] = out[3], out[4]
        if kg:
            gath[s0:s1] = out[5]
    return lse, logp, ent, topk_ids, topk_logp, gath


def _save_forward(ctx, out: tuple[Tensor, ...], inputs: tuple, temperature: float, chunk: int,
                  want_entropy: bool) -> tuple[Tensor, ...]:
    """The end of both autograd forwards: save ``inputs`` + (lse, entropy) for the recomputing backward, mark the
    top-K outputs non-differentiable, return (logp, entropy, topk_ids, topk_logp, gathered)."""
    lse, logp, ent, topk_ids, topk_logp, gath = out
    ctx.save_for_backward(*inputs, lse, ent)
    ctx.temperature, ctx.chunk, ctx.want_entropy = temperature, chunk, want_entropy
    ctx.mark_non_differentiable(topk_ids, topk_logp)
    ctx.set_materialize_grads(False)
    return logp, ent, topk_ids, topk_logp, gath


# ----------------------------------------------------------------------------------------------------------------
# From hidden states.
# ----------------------------------------------------------------------------------------------------------------


class _HiddenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tgt, gids, temperature, topk, want_entropy, chunk):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        chunk = -(-n // -(-n // chunk)) if n else chunk  # same tile count, sizes balanced (no 3-token last tile)
        ws = _Workspace(min(chunk, n) * v, acc, hidden.dtype, hidden.device, extra=1)
        out = _forward_tiles(
            n, chunk, lambda s0, s1: ws.logits(hidden[s0:s1], weight, bias, temperature),
            tgt, gids, topk, want_entropy, ws, acc, hidden.device,
        )
        return _save_forward(ctx, out, (hidden, weight, bias, tgt, gids), temperature, chunk, want_entropy)

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_ids, _g_topk, g_gath):
        hidden, weight, bias, tgt, gids, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not ctx.want_entropy:
            g_ent = None
        if not (need_h or need_w or need_b) or (g_logp is None and g_ent is None and g_gath is None):
            return (None,) * 9
        n, v = hidden.shape[0], weight.shape[0]
        acc = lse.dtype
        neg_a, g_ent_s, rows, ids, vals = _upstream(g_logp, g_gath, g_ent, tgt, gids, n, acc, 1.0 / ctx.temperature)
        # Vocabulary tiles holding as many elements as a forward tile: [n, vt] with n·vt ≈ chunk·V.
        vt = max(1, min(v, (ctx.chunk * v) // max(1, n)))
        ws = _Workspace(n * vt, acc, hidden.dtype, hidden.device, extra=g_ent_s is not None)
        low = hidden.dtype != acc
        grad_h = torch.zeros(n, hidden.shape[1], dtype=acc, device=hidden.device) if need_h else None
        gh_buf = torch.empty(n, hidden.shape[1], dtype=hidden.dtype, device=hidden.device) if need_h and low else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        ent_c = ent[:, None] if g_ent_s is not None else None
        lse_c = lse[:, None]
        edges = torch.arange(0, v + vt, vt, device=ids.device).clamp_(max=v)
        bounds = torch.searchsorted(ids, edges).tolist()  # sparse entries of each vocabulary tile (ids sorted)
        for i, v0 in enumerate(range(0, v, vt)):
            v1 = min(v, v0 + vt)
            w = weight[v0:v1]
            z = ws.logits(hidden, w, bias[v0:v1] if bias is not None else None, ctx.temperature)
            dz = _tile_grad(z, lse_c, ent_c, neg_a, g_ent_s, ws.scratch(z) if g_ent_s is not None else None)
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                dz.index_put_((rows[lo:hi], ids[lo:hi] - v0), vals[lo:hi], accumulate=True)
            if need_b:
                grad_b[v0:v1] = dz.sum(0)
            dz = ws.to_low(dz)
            if need_w:
                ws.grad_weight(dz, hidden, grad_w[v0:v1], accumulate=False)  # over all n tokens: written once
            if need_h:
                if not low:
                    grad_h.addmm_(dz, w)
                else:  # bf16/fp16 GEMM; partial sums over vocabulary tiles accumulated in fp32
                    grad_h += ws.grad_input(dz, w, gh_buf)
        del ws
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# From logits.
# ----------------------------------------------------------------------------------------------------------------


def _logit_tile(ws: "_Workspace", logits: Tensor, s0: int, s1: int, temperature: float) -> Tensor:
    """Rows [s0, s1) of the caller's logits, copied into the fp32 workspace (never modified in place) and ÷ τ."""
    z = ws.acc[: (s1 - s0) * logits.shape[1]].view(s1 - s0, logits.shape[1]).copy_(logits[s0:s1])
    return z.div_(temperature) if temperature != 1.0 else z


class _LogitStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tgt, gids, temperature, topk, want_entropy, chunk):
        n, v = logits.shape
        acc = _acc_dtype(logits.dtype)
        ws = _Workspace(min(chunk, n) * v, acc, acc, logits.device, extra=1)
        out = _forward_tiles(
            n, chunk, lambda s0, s1: _logit_tile(ws, logits, s0, s1, temperature),
            tgt, gids, topk, want_entropy, ws, acc, logits.device,
        )
        return _save_forward(ctx, out, (logits, tgt, gids), temperature, chunk, want_entropy)

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_ids, _g_topk, g_gath):
        logits, tgt, gids, lse, ent = ctx.saved_tensors
        if not ctx.want_entropy:
            g_ent = None
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None and g_gath is None):
            return (None,) * 7
        n, v = logits.shape
        acc = lse.dtype
        neg_a, g_ent_s, rows, ids, vals = _upstream(g_logp, g_gath, g_ent, tgt, gids, n, acc, 1.0 / ctx.temperature)
        # Sparse entries sorted by row for token tiles (the [N, V] gradient itself is unavoidable: it is the input's).
        order = rows.argsort(stable=True)
        rows, ids, vals = rows[order], ids[order], vals[order]
        bounds = torch.searchsorted(rows, torch.arange(0, n + ctx.chunk, ctx.chunk, device=rows.device)).tolist()
        ws = _Workspace(min(ctx.chunk, n) * v, acc, acc, logits.device, extra=g_ent_s is not None)
        grad = torch.empty_like(logits)
        for i, s0 in enumerate(range(0, n, ctx.chunk)):
            s1 = min(n, s0 + ctx.chunk)
            z = _logit_tile(ws, logits, s0, s1, ctx.temperature)
            dz = _tile_grad(
                z, lse[s0:s1, None], ent[s0:s1, None] if g_ent_s is not None else None, neg_a[s0:s1],
                g_ent_s[s0:s1] if g_ent_s is not None else None, ws.scratch(z) if g_ent_s is not None else None,
            )
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                dz.index_put_((rows[lo:hi] - s0, ids[lo:hi]), vals[lo:hi], accumulate=True)
            grad[s0:s1] = dz
        return grad, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------------------------


def _pack(out: tuple[Tensor, ...], lead: tuple[int, ...], topk: int, want_entropy: bool, gather: bool) -> TokenStats:
    logp, ent, topk_ids, topk_logp, gath = out
    return TokenStats(
        logp=logp.reshape(lead),
        entropy=ent.reshape(lead) if want_entropy else None,
        topk_ids=topk_ids.reshape(*lead, topk) if topk else None,
        topk_logp=topk_logp.reshape(*lead, topk) if topk else None,
        gathered_logp=gath.reshape(*lead, gath.shape[-1]) if gather else None,
    )


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    topk: int = 0,
    gather_ids: Tensor | None = None,
    chunk_size: int | None = None,
    entropy: bool = True,
) -> TokenStats:
    """Log-prob of ``target_ids``, entropy, top-K and log-probs at ``gather_ids`` of softmax((h·Wᵀ + b)/τ), tiled.

    Args:
        hidden: [..., H] final hidden states (after the model's final norm), fp32/bf16/fp16/fp64.
        weight: [V, H] lm-head weight, same dtype and device as ``hidden`` (a tied embedding matrix works as is).
        target_ids: [...] int token ids in [0, V): the sampled tokens a_t.
        bias: optional [V] lm-head bias.
        temperature: τ > 0; logits are divided by τ before the softmax, as at rollout time (trl#4159).
        topk: K ≥ 0 (≤ V); return the K most probable ids and their log-probs (no gradient; the rollout side).
        gather_ids: optional [..., K'] int ids in [0, V); return log π at them (differentiable; the trainer side of
            Top-K DPPO, fed with the rollout's top-K ids).
        chunk_size: tokens per forward tile; default ``default_chunk_size(V)`` = DEFAULT_TILE_BYTES (128 MB) of fp32
            logits, i.e. 220 tokens at V = 151,936, on every device (on an H200 a 1 GB tile made this two-pass
            path slower in bf16: 196 → 269 ms at N = 16,384; only the fused path takes the larger CUDA tile). The backward uses vocabulary tiles of the same element count.
        entropy: compute the entropy (one extra pass over each tile); ``False`` leaves ``entropy=None``.

    Returns:
        TokenStats with ``logp`` [...], ``entropy`` [...], ``topk_ids`` [..., K] int64, ``topk_logp`` [..., K],
        ``gathered_logp`` [..., K'], floats in fp32 (fp64 for fp64 inputs) whatever the input dtype.
        ``logp``, ``entropy`` and ``gathered_logp`` are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Memory: O(chunk_size·V) extra in forward and backward plus O(N·(K + K')) outputs; never O(N·V). The backward
    recomputes the logits (one extra GEMM). Logits must be finite (a −inf bias entry makes the entropy NaN).
    Works on any device; GEMMs run in the input dtype, everything after them in fp32.
    """
    hidden, weight, bias = _check_head(hidden, weight, bias)
    v = weight.shape[0]
    temperature, topk = _check_common(temperature, topk, chunk_size, v)
    lead = tuple(hidden.shape[:-1])
    tgt, gids = _flat_ids(target_ids, gather_ids, lead, v, hidden.device)
    chunk = chunk_size or default_chunk_size(v, hidden.dtype)
    out = _HiddenStats.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, tgt, gids, temperature, topk, bool(entropy), chunk
    )
    return _pack(out, lead, topk, bool(entropy), gids is not None)


def token_stats_from_logits(
    logits: Tensor,
    target_ids: Tensor,
    *,
    temperature: float = 1.0,
    topk: int = 0,
    gather_ids: Tensor | None = None,
    chunk_size: int | None = None,
    entropy: bool = True,
) -> TokenStats:
    """``token_stats`` for a caller that already holds ``logits`` [..., V] (= h·Wᵀ + b, before the temperature).

    Same outputs and dtypes as ``token_stats(hidden, weight, ...)`` with ``logits = hidden @ weight.T + bias``;
    differentiable w.r.t. ``logits``. Tiled over tokens, so beyond the logits themselves (and their [..., V]
    gradient) only O(chunk_size·V) fp32 scratch is used: no full fp32 copy or log_softmax of the logits.
    """
    logits = _float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    v = logits.shape[-1]
    temperature, topk = _check_common(temperature, topk, chunk_size, v)
    lead = tuple(logits.shape[:-1])
    tgt, gids = _flat_ids(target_ids, gather_ids, lead, v, logits.device)
    chunk = chunk_size or default_chunk_size(v, logits.dtype)
    out = _LogitStats.apply(logits.reshape(-1, v), tgt, gids, temperature, topk, bool(entropy), chunk)
    return _pack(out, lead, topk, bool(entropy), gids is not None)
