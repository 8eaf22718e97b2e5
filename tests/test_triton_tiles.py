"""The Triton tile kernels (dppo._triton_tiles) against an fp64 truth and against the PyTorch tile path.

They run on CPU tensors under Triton's interpreter, which must be chosen before triton is first imported: `make test`
runs this file a second time as `TRITON_INTERPRET=1 DPPO_REQUIRE_TRITON=1 pytest tests/test_triton_tiles.py` (in
the main pytest call it is skipped). On a CUDA machine without that variable they run compiled, on the GPU.

Shapes are small (the interpreter runs every program and block in Python): V = 257 in blocks of 64 columns (four
full blocks and one of a single column, where V − 1 lies) and V = 37 (less than one block). The kernels compute in
fp32 whatever the tile's dtype, so for bf16/fp16 tiles the statistics are held to the same fp32 tolerance, against
the fp64 computation on the same rounded logits; only dz's final rounding to the tile's dtype adds its half-ulp.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("DPPO_REQUIRE_TRITON") == "1":
    import triton  # noqa: F401  (make test: a missing triton fails here instead of skipping)
else:
    pytest.importorskip("triton")

from dppo import PRESETS, _triton_tiles as tt  # noqa: E402
from dppo._tiles import _tile_stats  # noqa: E402
from test_fused import fused, grads, make, max_rel, reference  # noqa: E402

if tt.interpreted():
    DEV = "cpu"
elif torch.cuda.is_available():
    DEV = "cuda"
elif os.environ.get("DPPO_REQUIRE_TRITON") == "1":
    raise RuntimeError("DPPO_REQUIRE_TRITON=1 but neither TRITON_INTERPRET=1 (set before triton's import) nor a CUDA "
                       "device: the Triton kernels cannot run")
else:
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1 at triton's import (make test runs this "
                "file again that way)", allow_module_level=True)

BLOCK = 64
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(tt, "MAX_BLOCK_V", BLOCK)  # several blocks per row, the last one ragged
    monkeypatch.setenv(tt.KERNEL_ENV, "triton")


def tile(v: int, dtype: torch.dtype, seed: int = 0):
    """Five rows that stress the statistics: ordinary, shifted by ±1000 (|z| large: the shift must be exact), one
    logit 30 above the rest (p → 1: log π → 0⁻, entropy → 0⁺) and flat (entropy = log V exactly); ids at both ends
    of the vocabulary, in the ragged last block, duplicated, and the sampled id among the gathered ones."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, v, generator=g, dtype=torch.float64) * 4
    z[1] += 1000
    z[2] -= 1000
    z[3, v // 2] += 30
    z[4] = 0.5
    tgt = torch.tensor([0, v - 1, 5, v // 2, v - 1])
    k = 5  # not a power of two: the id block is masked
    gids = torch.randint(0, v, (5, k), generator=g)
    gids[:, 0], gids[:, 1], gids[:, 2], gids[0, 3] = 0, v - 1, tgt, 0
    return z.to(dtype), tgt, gids


def truth(z: torch.Tensor, tau: float):
    zt = z.double() / tau
    lp = zt.log_softmax(-1)
    return zt, lp, zt.logsumexp(-1), -(lp.exp() * lp).sum(-1)


def rounding(zt: torch.Tensor) -> torch.Tensor:
    """η: per row, a bound on the fp32 error of each z/τ and of the shift z/τ − m (a few ulps of the row's largest
    |z/τ|: the scaling by 1/τ rounds there)."""
    return 8 * EPS32 * zt.abs().amax(-1)


def fp32_tol(zt: torch.Tensor) -> torch.Tensor:
    """Per-row absolute tolerance of a log-probability or log-sum-exp: η plus the log-sum-exp's own rounding."""
    return rounding(zt) + 4e-6


def entropy_tol(zt: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
    """Errors δ_v ≤ η in z/τ move H = −Σ p log p by −Σ p_v (log p_v + H) δ_v, at most 2ηH to first order; plus the
    sums' own rounding."""
    return 2 * rounding(zt) * ent + 4e-6 * ent.clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [257, 37])
def test_stats_kernel_against_fp64_truth(dtype, v):
    tau = 0.7
    z, tgt, gids = tile(v, dtype)
    z, tgt, gids = z.to(DEV), tgt.to(DEV), gids.to(DEV)
    x, ent, gath, lse = tt.tile_stats(z, tau, tgt, gids, True)
    zt, lp, lse64, ent64 = (t.cpu() for t in truth(z.cpu(), tau))
    tol = fp32_tol(zt)
    x, ent, gath, lse = x.cpu(), ent.cpu(), gath.cpu(), lse.cpu()
    assert x.dtype == ent.dtype == gath.dtype == lse.dtype == torch.float32
    assert ((lse.double() - lse64).abs() <= tol).all(), (lse, lse64)
    assert ((x.double() - lp.gather(1, tgt.cpu()[:, None])[:, 0]).abs() <= tol).all()
    assert ((gath.double() - lp.gather(1, gids.cpu())).abs() <= tol[:, None]).all()
    assert ((ent.double() - ent64).abs() <= entropy_tol(zt, ent64)).all(), (ent, ent64)
    assert ent[4].item() == pytest.approx(math.log(v), rel=2 * EPS32)  # flat row: exactly log V
    # no positive log-probabilities (verl#2656) and no negative entropy, even where p → 1
    assert (x <= 0).all() and (gath <= 0).all() and (ent >= 0).all()
    assert -1e-5 < x[3].item() <= 0 and 0 <= ent[3].item() < 1e-5
    # the PyTorch tile path on the same fp32 values agrees to the same tolerance
    zf = (z.float() / tau).cpu()
    _, x_pt, ent_pt, _, _, g_pt, _, _ = _tile_stats(zf.clone(), torch.empty_like(zf), tgt.cpu(), gids.cpu(), 0, True)
    assert ((x - x_pt).abs() <= tol).all() and ((gath - g_pt).abs() <= tol[:, None]).all()
    assert ((ent.double() - ent_pt.double()).abs() <= 2 * entropy_tol(zt, ent64)).all()


def test_stats_kernel_without_entropy_or_ids_and_empty_tile():
    z, tgt, _ = tile(257, torch.float32)
    z, tgt = z.to(DEV), tgt.to(DEV)
    x, ent, gath, lse = tt.tile_stats(z, 1.0, tgt, None, False)
    assert ent is None and gath is None
    zt, lp, lse64, _ = truth(z.cpu(), 1.0)
    assert ((x.cpu().double() - lp.gather(1, tgt.cpu()[:, None])[:, 0]).abs() <= fp32_tol(zt)).all()
    x, ent, gath, lse = tt.tile_stats(z[:0], 1.0, tgt[:0], torch.zeros(0, 3, dtype=torch.long, device=DEV), True)
    assert x.shape == ent.shape == lse.shape == (0,) and gath.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dz_kernel_against_fp64_truth(dtype):
    """dz = c·(onehot(a) − softmax(z/τ)), written over the tile in its dtype: within fp32 error of the truth, plus
    one rounding to the tile's dtype; each row sums to ~0; a zero coefficient gives an exactly zero row."""
    tau, v = 0.7, 257
    z, tgt, _ = tile(v, dtype, seed=1)
    coef = torch.tensor([1.3, -0.4, 2e-3, 0.0, -7.0])
    z, tgt = z.to(DEV), tgt.to(DEV)
    zt, lp, _, _ = truth(z.cpu(), tau)
    _, _, _, lse = tt.tile_stats(z, tau, tgt, None, False)
    ptr = z.data_ptr()
    dz = tt.tile_dz_(z, tau, tgt, lse, coef.to(DEV))
    assert dz.data_ptr() == ptr and dz.dtype == dtype  # in place, in the GEMM dtype
    want = coef.double()[:, None] * (torch.nn.functional.one_hot(tgt.cpu(), v).double() - lp.exp())
    err = (dz.cpu().double() - want).abs()
    half_ulp = 0.5 * torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny
    assert (err <= coef.double().abs()[:, None] * fp32_tol(zt)[:, None] + half_ulp).all(), err.max()
    assert (dz[3] == 0).all()
    rows = dz.cpu().double().sum(-1).abs()
    assert (rows <= coef.double().abs() * (v * fp32_tol(zt)) + v * half_ulp.amax(-1)).all()


def test_dz_rounds_to_nearest_even_in_bf16():
    """The bf16 dz is fp32 rounded to nearest even, as torch (and compiled Triton) casts, ties and extremes
    included (3.4e38 rounds up to inf). Rows of one column with lse = +inf make dz = c exactly before the cast.
    (Triton 3.9's interpreter alone would truncate toward zero; the kernel rounds by hand.)"""
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(96, generator=g) * 10.0 ** torch.randint(-35, 35, (96,), generator=g)
    ties = (torch.randn(96, generator=g).bfloat16().float().view(torch.int32) + 0x8000).view(torch.float32)
    # (fp32 subnormals left out: the interpreter flushes them to 0, as GPUs may; they are far below any gradient)
    odd = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.3895e38, -3.3895e38, 3.4e38, 2e-38, -2e-38, 0.0])
    c = torch.cat([rnd, ties, -ties, odd])
    n = c.numel()
    z = torch.zeros(n, 1, dtype=torch.bfloat16, device=DEV)
    lse = torch.full((n,), float("inf"), device=DEV)
    dz = tt.tile_dz_(z, 1.0, torch.zeros(n, dtype=torch.long, device=DEV), lse, c.to(DEV))
    want = c.to(torch.bfloat16)
    assert torch.equal(dz[:, 0].cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fp32_triton_equals_torch(name, monkeypatch):
    """policy_loss_from_hidden through the kernels (3 tiles, τ = 0.7, bias; sampled ids 0 and V − 1 among the
    tokens) against its PyTorch tile path: same loss, metrics and gradients to fp32 rounding (TRM takes the two-pass
    path either way)."""
    b = make(name, dtype=torch.float32, B=4, T=6, seed=4)
    b["response_ids"][0, :2] = torch.tensor([0, b["weight"].shape[0] - 1])  # row 0 is a full-length response
    b = {k: (t.detach().to(DEV).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
         for k, t in b.items()}
    loss, met = fused(name, b, temperature=0.7, chunk_size=4)
    got = grads(loss, b)
    monkeypatch.setenv(tt.KERNEL_ENV, "torch")
    ref_loss, ref_met = fused(name, b, temperature=0.7, chunk_size=4)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7)
    assert set(met) == set(ref_met)
    for k in met:
        assert met[k] == pytest.approx(ref_met[k], rel=1e-5, abs=1e-6), k
    for x, y in zip(got, grads(ref_loss, b)):
        assert max_rel(x, y) < 1e-5


@pytest.mark.parametrize("name", ["dppo-topk-tv", "dppo-binary-kl", "grpo-clip-higher"])
def test_bf16_close_to_torch_path_and_to_the_truth(name, monkeypatch):
    """bf16 hidden/weight/bias (dz rounded to bf16 by the kernel, as the PyTorch path rounds it before the GEMMs):
    the loss equals the PyTorch path's to fp32 rounding, the gradients agree to bf16 rounding, and their error
    against the fp64 truth (same bf16-rounded inputs) is within 1.5× the PyTorch path's (+0.5 %)."""
    b64 = make(name, seed=2, B=4, T=6, padding=False)

    def cast(dtype):
        return {k: (t.detach().to(torch.bfloat16).to(dtype).to(DEV).requires_grad_()
                    if k in ("hidden", "weight", "bias") and t is not None
                    else t.float().to(DEV) if isinstance(t, torch.Tensor) and t.is_floating_point()
                    else t.to(DEV) if isinstance(t, torch.Tensor) else t)
                for k, t in b64.items()}

    b16, b_true = cast(torch.bfloat16), cast(torch.float64)
    loss, met = fused(name, b16, chunk_size=8)
    got = grads(loss, b16)
    monkeypatch.setenv(tt.KERNEL_ENV, "torch")
    truth_g = grads(reference(name, b_true)[0], b_true)
    ref_loss, ref_met = fused(name, b16, chunk_size=8)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    assert met["entropy"] == pytest.approx(ref_met["entropy"], rel=1e-5)
    for x, y, t in zip(got, grads(ref_loss, b16), truth_g):
        assert x.dtype == torch.bfloat16
        assert max_rel(x, y) < 1e-2
        assert max_rel(x, t) <= 1.5 * max_rel(y, t) + 5e-3


def test_no_grad_and_no_entropy(monkeypatch):
    b = make("dppo-topk-kl", dtype=torch.float32, B=4, T=6, seed=5)
    b = {k: (t.detach().to(DEV) if isinstance(t, torch.Tensor) else t) for k, t in b.items()}
    with torch.no_grad():
        loss, met = fused("dppo-topk-kl", b, entropy=False)
    monkeypatch.setenv(tt.KERNEL_ENV, "torch")
    with torch.no_grad():
        ref_loss, ref_met = fused("dppo-topk-kl", b, entropy=False)
    assert "entropy" not in met and loss.grad_fn is None
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7)
