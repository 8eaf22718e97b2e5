"""Triton kernels for the per-tile work of :func:`dppo.policy_loss_from_hidden` (:mod:`dppo.fused`).

The PyTorch tile path (:func:`dppo._tiles._tile_stats` and the dz lines of :mod:`dppo.fused`) makes about ten
elementwise passes over each [c, V] tile of logits (the fp32 upcast, z − m, exp, Σ, the entropy's e·y and Σ, the
softmax for dz, its cast back to the GEMM dtype). On a GPU each of those costs as much as a GEMM over the tile
(docs/benchmarks.md: GEMMs were 39 % of the fused Top-K DPPO path's CUDA time on an H200). Here the same work is two
kernels that read the tile as the GEMM wrote it (bf16, fp16 or fp32; one program per token row, looping over V in
blocks of ``BLOCK_V``):

    stats   one read of z_t:  running max m and s = Σ_v exp(z_tv/τ − m)  (online log-sum-exp),
            u = Σ_v exp(z_tv/τ − m)·(z_tv/τ − m)  (rescaled with s whenever m grows), then
            lse_t = m + log s,   log π(a_t) = (z_t[a_t]/τ − m) − log s,   log π(k) likewise for μ's top-K ids k,
            H_t = log s − u / s   (entropy; the shifted form has no cancellation when |z| is large)
    dz      one read and one write of z_t, in place:
            dz_tv = c_t · (1[v = a_t] − exp(z_tv/τ − lse_t))   in the GEMM dtype, ready for dh = dz·W, dW += dzᵀ·h

with c_t = w_t·∂ℓ_t/∂x_t / τ (:func:`dppo.fused._slopes`), computed in PyTorch between the two from the [c] vectors
(it depends on the method's whole token rule). All arithmetic is fp32 (z/τ as z·(1/τ): one multiply, within an ulp
of the PyTorch path's division); dz is rounded to nearest even when stored as bf16; rows are addressed with int64
offsets (a tile may exceed 2³¹ elements). Ids are not bounds-checked here: the callers validate them
(:func:`dppo._tiles._check_ids`).

Which path runs is chosen by the environment variable ``DPPO_TILE_KERNEL``: ``auto`` (default: the PyTorch path for
now: the kernels have passed their tests under Triton's interpreter only, never compiled on a GPU; once
``benchmarks/cuda_check.sh`` with ``PARTS=tiles`` has passed on one, ``auto`` is meant to pick them for fp32/bf16/fp16
on CUDA), ``torch`` (always the PyTorch path, the reference) or ``triton`` (these kernels or an error).

On CPU tensors the kernels run only under Triton's interpreter, which ``TRITON_INTERPRET=1`` selects *when triton is
first imported*: ``triton.jit`` then returns interpreted functions, and so it does for triton.language's own
``tl.max``/``tl.sum`` (themselves ``@triton.jit`` functions). Setting the variable later, or building an interpreted
function for one kernel only, fails inside the kernel ("Cannot call @triton.jit'd outside of the scope of a
kernel"). That is how the tests run them without a GPU (tests/test_triton_tiles.py; slow, small shapes only).
"""

import os

import torch
from torch import Tensor

# No `from __future__ import annotations` here: the kernels' `tl.constexpr` annotations stay objects, the form every
# Triton version reads (string annotations are parsed by recent versions only).
try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path is the fallback
    triton = None

    class tl:  # noqa: N801  (the kernels' annotations still evaluate; nothing calls them)
        constexpr = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

__all__ = ["KERNEL_ENV", "interpreted", "use_triton", "tile_stats", "tile_dz_"]

KERNEL_ENV = "DPPO_TILE_KERNEL"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per block of a row (a power of two; the last block of a row is masked, so V need not divide). 32,768 with
# 32 warps is what Liger-Kernel's cross-entropy kernel uses on Hopper for the same row-streaming pattern; not yet
# tuned for these kernels (benchmarks/token_stats_cuda.py --sweep times the choices on a GPU).
MAX_BLOCK_V = 32768
NUM_WARPS = 32


def use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused loss's tiles go through the Triton kernels (module docstring: ``DPPO_TILE_KERNEL``)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{KERNEL_ENV} must be 'auto', 'torch' or 'triton', got {choice!r}")
    if choice == "torch":
        return False
    if choice == "auto":  # not before the kernels have passed their tests compiled on a GPU (module docstring)
        return False
    if triton is None:
        raise ImportError(f"{KERNEL_ENV}=triton but the triton package does not import: pip install 'dppo[triton]'")
    if dtype not in DTYPES:
        raise ValueError(f"{KERNEL_ENV}=triton supports fp32, bf16 and fp16 hidden states/weights, got {dtype} "
                         f"(fp64 takes the PyTorch path: unset {KERNEL_ENV} or set it to 'torch')")
    if device.type == "cpu" and not interpreted():
        raise ValueError(f"{KERNEL_ENV}=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before triton is first imported (or use a CUDA device)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{KERNEL_ENV}=triton runs on CUDA devices (and on CPU under Triton's interpreter), "
                         f"not on {device.type}")
    return True


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import; module docstring)."""
    return triton is not None and type(_stats_kernel).__name__ == "InterpretedFunction"


@_jit
def _stats_kernel(z_ptr, stride_z, tgt_ptr, gids_ptr, stride_g, x_ptr, lse_ptr, ent_ptr, gath_ptr, V, K, inv_tau,
                  HAS_GIDS: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = float("-inf")  # running max of z/τ
    s = 0.0  # Σ exp(z/τ − m)
    u = 0.0  # Σ exp(z/τ − m)·(z/τ − m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)  # 0 on the first block (m = −inf)
        e = tl.exp(z - m_new)  # 0 on the masked columns
        if WANT_ENT:
            # the blocks seen, re-shifted to m': Σ e'·(y + m − m') = α·(u + (m − m')·s); on the first block
            # s = 0 and m = −inf, where (m − m')·s would be −inf·0
            d = tl.where(s > 0.0, m - m_new, 0.0)
            y = tl.where(ok, z - m_new, 0.0)
            u = alpha * (u + d * s) + tl.sum(e * y, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)
    a = tl.load(tgt_ptr + row)
    z_a = tl.load(z_row + a).to(tl.float32) * inv_tau
    tl.store(x_ptr + row, (z_a - m) - log_s)
    if WANT_ENT:
        tl.store(ent_ptr + row, log_s - u / s)
    if HAS_GIDS:
        ks = tl.arange(0, BLOCK_K)
        okk = ks < K
        g = tl.load(gids_ptr + row * stride_g + ks, mask=okk, other=0)
        z_g = tl.load(z_row + g, mask=okk, other=0.0).to(tl.float32) * inv_tau
        tl.store(gath_ptr + row * K + ks, (z_g - m) - log_s, mask=okk)


@_jit
def _dz_kernel(z_ptr, stride_z, tgt_ptr, lse_ptr, coef_ptr, V, inv_tau,
               BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    lse = tl.load(lse_ptr + row)
    c = tl.load(coef_ptr + row)
    a = tl.load(tgt_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_tau
        cp = c * tl.exp(z - lse)
        dz = tl.where(cols == a, c - cp, -cp)
        if ROUND_BF16:
            # fp32 → bf16 rounded to nearest even by hand (then the cast is exact): compiled Triton rounds so, but
            # Triton's interpreter (3.9) truncates toward zero; this way both run, and the tests check, one rounding
            bits = dz.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            dz = bits.to(tl.float32, bitcast=True)
        tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=ok)


def _launch(z: Tensor, block_v: int | None, num_warps: int | None) -> tuple[int, dict]:
    bv = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(z.shape[1]))
    nw = num_warps or max(1, min(NUM_WARPS, bv // 1024))  # ≥ 32 columns per thread (Liger's 32,768 / 32 warps)
    return bv, ({} if z.device.type == "cpu" else dict(num_warps=nw))


def _check_tile(z: Tensor, tgt: Tensor) -> None:
    if z.dim() != 2 or z.stride(1) != 1 or z.dtype not in DTYPES:
        raise ValueError(f"the logits tile must be a row-major [c, V] fp32/bf16/fp16 tensor, got {tuple(z.shape)} "
                         f"{z.dtype} with strides {z.stride()}")
    if tgt.shape != (z.shape[0],) or tgt.dtype != torch.int64:
        raise ValueError(f"target ids must be int64 [{z.shape[0]}], got {tgt.dtype} {tuple(tgt.shape)}")


def tile_stats(z: Tensor, temperature: float, tgt: Tensor, gids: Tensor | None, want_entropy: bool, *,
               block_v: int | None = None, num_warps: int | None = None
               ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Statistics of one tile of logits in one read (module docstring, ``stats``).

    Args:
        z: [c, V] logits h·Wᵀ (+ b) as the GEMM wrote them (fp32/bf16/fp16, rows contiguous), *not* divided by τ.
        temperature: τ > 0. tgt: [c] int64 sampled ids a_t. gids: [c, K] int64 ids to gather (μ's top-K) or None.
    Returns:
        (log π(a_t) [c], entropy [c] or None, log π at gids [c, K] or None, lse_t [c]), all fp32, for z/τ.
    """
    _check_tile(z, tgt)
    c, v = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    x, lse = torch.empty(c, **f32), torch.empty(c, **f32)
    ent = torch.empty(c if want_entropy else 1, **f32)
    k = gids.shape[1] if gids is not None else 0
    gath = torch.empty(c, max(k, 1), **f32)
    if c == 0:
        return x, (ent if want_entropy else None), (gath[:, :k] if gids is not None else None), lse
    if gids is not None:
        if gids.shape != (c, k) or gids.dtype != torch.int64:
            raise ValueError(f"gather ids must be int64 [{c}, K], got {gids.dtype} {tuple(gids.shape)}")
        gids = gids.contiguous()
    bv, kw = _launch(z, block_v, num_warps)
    _stats_kernel[(c,)](z, z.stride(0), tgt.contiguous(), gids if k else tgt, gids.stride(0) if k else 0,
                        x, lse, ent, gath, v, k, 1.0 / temperature, HAS_GIDS=bool(k), WANT_ENT=bool(want_entropy),
                        BLOCK_V=bv, BLOCK_K=triton.next_power_of_2(max(k, 1)), **kw)
    return x, (ent if want_entropy else None), (gath[:, :k] if gids is not None else None), lse


def tile_dz_(z: Tensor, temperature: float, tgt: Tensor, lse: Tensor, coef: Tensor, *, block_v: int | None = None,
             num_warps: int | None = None) -> Tensor:
    """Overwrites the tile of logits ``z`` (as in :func:`tile_stats`) with dz = c·(onehot(a) − softmax(z/τ)) and
    returns it: ∂L/∂(z/τ) row by row for ``coef`` = c [c] (fp32), in z's dtype (module docstring, ``dz``)."""
    _check_tile(z, tgt)
    c, v = z.shape
    if c == 0:
        return z
    bv, kw = _launch(z, block_v, num_warps)
    _dz_kernel[(c,)](z, z.stride(0), tgt.contiguous(), lse.float().contiguous(), coef.float().contiguous(), v,
                     1.0 / temperature, BLOCK_V=bv, ROUND_BF16=z.dtype == torch.bfloat16, **kw)
    return z
