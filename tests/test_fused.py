"""dppo.policy_loss_from_hidden against token_stats + policy_loss (itself tested against the naive path and the
paper's rules): same loss, metrics and gradients for every preset, in fp64 to ~1e-12 and in fp32 to fp32 rounding;
3 GEMMs of N·V·H and no [N, V] tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dppo import PRESETS, policy_loss, policy_loss_from_hidden, token_stats


def make(name: str, dtype=torch.float64, B=8, T=12, H=12, V=257, K=6, seed=0, bias=True, padding=True, scale=4.0):
    """A batch where the rollout μ and the recomputed π_θ′ are perturbations of the current π_θ: a_t ~ μ, so that
    masks, caps, bands and gates all trigger on some tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    z = hidden @ weight.T + (b if b is not None else 0)
    mu_logits = z + 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    old_logits = z + 0.8 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    lmu_all = mu_logits.log_softmax(-1)
    ids = torch.multinomial(lmu_all.exp().reshape(-1, V), 1, generator=g).reshape(B, T)
    top = lmu_all.topk(K, dim=-1)
    lens = torch.tensor([T, 1, T - 3, 0, T - 1, 2, T, 5][:B]) if padding else torch.full((B,), T)
    mask = torch.arange(T)[None, :] < lens[:, None]
    batch = dict(
        hidden=hidden.to(dtype).requires_grad_(), weight=weight.to(dtype).requires_grad_(),
        bias=b.to(dtype).requires_grad_() if b is not None else None, response_ids=ids,
        rollout_logp=lmu_all.gather(-1, ids[..., None])[..., 0].to(torch.float32 if dtype != torch.float64 else dtype),
        advantages=torch.randn(B, generator=g, dtype=torch.float64).to(torch.float32 if dtype != torch.float64
                                                                        else dtype),
        response_mask=mask,
        old_logp=old_logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] if PRESETS[name].needs_old_logp
        else None,
        rollout_topk_ids=top.indices, rollout_topk_logp=top.values,
    )
    if batch["old_logp"] is not None:
        batch["old_logp"] = batch["old_logp"].to(batch["rollout_logp"].dtype)
    batch["rollout_topk_logp"] = batch["rollout_topk_logp"].to(batch["rollout_logp"].dtype)
    return batch


def reference(name, b, temperature=1.0, chunk_size=None, denominator=None):
    m = PRESETS[name]
    gids = b["rollout_topk_ids"] if m.needs_topk else None
    st = token_stats(b["hidden"], b["weight"], b["response_ids"], bias=b["bias"], temperature=temperature,
                     gather_ids=gids, chunk_size=chunk_size)
    topk = {}
    if m.needs_topk:
        topk = dict(logp_at_rollout_topk=st.gathered_logp, rollout_topk_logp=b["rollout_topk_logp"],
                    sampled_in_topk=(gids == b["response_ids"][..., None]).any(-1))
    loss, met = policy_loss(m, st.logp, b["rollout_logp"], b["advantages"], b["response_mask"], old_logp=b["old_logp"],
                            denominator=denominator, **topk)
    resp = b["response_mask"]
    met["entropy"] = float((st.entropy.detach().float() * resp).sum() / resp.sum().clamp(min=1))
    return loss, met


def fused(name, b, **kw):
    return policy_loss_from_hidden(name, b["hidden"], b["weight"], b["response_ids"], b["rollout_logp"],
                                   b["advantages"], b["response_mask"], bias=b["bias"], old_logp=b["old_logp"],
                                   rollout_topk_ids=b["rollout_topk_ids"], rollout_topk_logp=b["rollout_topk_logp"],
                                   **kw)


def grads(loss, b):
    params = [b["hidden"], b["weight"]] + ([b["bias"]] if b["bias"] is not None else [])
    return torch.autograd.grad(loss, params)


def max_rel(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_metrics(got, want, rel):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=rel), (k, got[k], want[k])


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fp64_same_loss_metrics_gradients(name):
    b = make(name)
    ref_loss, ref_met = reference(name, b, temperature=0.7, chunk_size=5)
    loss, met = fused(name, b, temperature=0.7, chunk_size=5)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * max(1.0, abs(ref_loss.item()))
    check_metrics(met, ref_met, 1e-6)  # metrics are reported in fp32 either way
    for x, y in zip(grads(loss, b), grads(ref_loss, b)):
        assert max_rel(x, y) < 1e-12
    # the batch exercises every part of the method: its mask, cap, gate, band and cap on π_θ′/μ each act somewhere
    m = PRESETS[name]
    assert met["masked_frac"] > 0 or m.estimator == "none"
    assert met["capped_frac"] > 0 or m.ratio_cap == math.inf
    assert met["seq_dropped_frac"] > 0 or not any(g.KIND in ("sequence", "offpolicy") for g in m.gates)
    assert met["behavior_masked_frac"] > 0 or m.behavior is None or (m.behavior.low, m.behavior.high) == (0, math.inf)
    assert met["behavior_capped_frac"] > 0 or m.behavior is None or m.behavior.cap == math.inf


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fp32(name):
    b = make(name, dtype=torch.float32, seed=1)
    ref_loss, ref_met = reference(name, b, chunk_size=7)
    loss, met = fused(name, b, chunk_size=7)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    check_metrics(met, ref_met, 1e-5)
    for x, y in zip(grads(loss, b), grads(ref_loss, b)):
        assert max_rel(x, y) < 1e-5


@pytest.mark.parametrize("name", ["dppo-binary-tv", "dppo-topk-kl-scaling", "grpo"])
def test_bf16_close_to_token_stats_and_to_the_truth(name):
    """bf16 hidden/weight: bf16 GEMMs, fp32 softmax and loss; dW accumulated in bf16 over the 16 token tiles. The
    truth is the fp64 computation on the same bf16-rounded inputs. The fused gradients stay within 1 % of
    token_stats + policy_loss's and their error against the truth within 1.5× of that path's (+0.5 %)."""
    b64 = make(name, seed=2, padding=False, T=16)

    def cast(dtype):
        return {k: (v.detach().to(torch.bfloat16).to(dtype).requires_grad_() if k in ("hidden", "weight", "bias")
                    and v is not None else v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in b64.items()}

    b16, b_true = cast(torch.bfloat16), cast(torch.float64)
    truth = grads(reference(name, b_true)[0], b_true)
    loss, _ = fused(name, b16, chunk_size=8)
    ref_loss, _ = reference(name, b16, chunk_size=8)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-6)
    for x, y, t in zip(grads(loss, b16), grads(ref_loss, b16), truth):
        assert x.dtype == torch.bfloat16
        assert max_rel(x, y) < 1e-2
        assert max_rel(x, t) <= 1.5 * max_rel(y, t) + 5e-3


def test_denominator_grad_scaling_and_no_grad():
    b = make("dppo-binary-kl")
    den = 11.0
    loss, met = fused("dppo-binary-kl", b, denominator=den)
    ref_loss, ref_met = reference("dppo-binary-kl", b, denominator=den)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    g = grads(2.5 * loss, b)
    for x, y in zip(g, grads(ref_loss, b)):
        torch.testing.assert_close(x, 2.5 * y, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        loss2, met2 = fused("dppo-binary-kl", b, denominator=den)
    assert loss2.grad_fn is None and loss2.item() == loss.item() and met2 == met


@pytest.mark.parametrize("name", ["dppo-binary-kl", "icepop", "ipo-kl"])
def test_padding_may_hold_minus_inf(name):
    """Rollouts may pad log μ (and π_θ′) with −inf: the fused loss, metrics and gradients stay finite and equal."""
    b = make(name)
    pad = ~b["response_mask"]
    b["rollout_logp"] = b["rollout_logp"].masked_fill(pad, float("-inf"))
    if b["old_logp"] is not None:
        b["old_logp"] = b["old_logp"].masked_fill(pad, float("-inf"))
    loss, met = fused(name, b)
    ref_loss, ref_met = reference(name, b)
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in met.values())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    check_metrics(met, ref_met, 1e-6)
    for x, y in zip(grads(loss, b), grads(ref_loss, b)):
        assert torch.isfinite(x).all() and max_rel(x, y) < 1e-12


def test_all_padding_and_weight_only_gradient():
    b = make("grpo")
    b["response_mask"] = torch.zeros_like(b["response_mask"])
    loss, met = fused("grpo", b)
    assert loss.item() == 0.0 and met["tokens"] == 0
    assert all((x == 0).all() for x in grads(loss, b))
    b = make("grpo")
    b["hidden"] = b["hidden"].detach()  # hidden without grad: only dW, db are built
    loss, _ = fused("grpo", b)
    ref_loss, _ = reference("grpo", b)
    gw = torch.autograd.grad(loss, [b["weight"]])[0]
    torch.testing.assert_close(gw, torch.autograd.grad(ref_loss, [b["weight"]])[0], rtol=1e-12, atol=1e-14)


def test_trm_falls_back_to_two_passes():
    """TRM's gate needs the whole sequence's current log π: the fused entry point runs token_stats + policy_loss."""
    assert not PRESETS["trm"].single_pass
    b = make("trm")
    counter = _Gemms()
    with counter:
        loss, met = fused("trm", b)
        loss.backward()
    n = int(b["response_mask"].numel())  # token_stats does not skip padding
    assert counter.flops == 4 * n * 257 * 12  # forward, recompute, dh, dW
    assert met["seq_masked_frac"] > 0


class _Gemms(TorchDispatchMode):
    """Sums m·k·n over every matrix multiply, and the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.flops, self.max_numel = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "aten.mm" in name or "aten.addmm" in name:
            a, c = (args[0], args[1]) if "aten.mm" in name else (args[1], args[2])
            self.flops += a.shape[0] * a.shape[1] * c.shape[1]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("name", ["dppo-binary-tv", "dppo-topk-tv", "icepop"])
def test_three_gemms_and_no_n_by_v_tensor(name):
    """Forward + backward multiply N·V·H three times (logits, dh, dW) over the response tokens only (padding is
    skipped), and no tensor is larger than one tile of logits or dW."""
    b = make(name, dtype=torch.float32, B=8, T=25, H=4, V=300)
    n = int(b["response_mask"].sum())
    chunk = 10
    counter = _Gemms()
    with counter:
        loss, _ = fused(name, b, chunk_size=chunk)
        loss.backward()
    assert counter.flops == 3 * n * 300 * 4
    assert counter.max_numel <= max(chunk * 300, 8 * 25 * 4), counter.max_numel
    assert n * 300 > chunk * 300 * 5  # the batch spans many tiles


def test_bad_input_is_named():
    b = make("dppo-topk-tv")
    with pytest.raises(ValueError, match="needs rollout_topk_ids and rollout_topk_logp"):
        policy_loss_from_hidden("dppo-topk-tv", b["hidden"], b["weight"], b["response_ids"], b["rollout_logp"],
                                b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        policy_loss_from_hidden("pg-is", b["hidden"][0], b["weight"], b["response_ids"], b["rollout_logp"],
                                b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="response_ids holds ids outside"):
        policy_loss_from_hidden("pg-is", b["hidden"], b["weight"], b["response_ids"] + 1000, b["rollout_logp"],
                                b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match=r"rollout_logp must be \[B, T\]"):
        policy_loss_from_hidden("pg-is", b["hidden"], b["weight"], b["response_ids"], b["rollout_logp"][:, :3],
                                b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="needs old_logp"):
        policy_loss_from_hidden("icepop", b["hidden"], b["weight"], b["response_ids"], b["rollout_logp"],
                                b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="response_mask has shape"):
        policy_loss_from_hidden("pg-is", b["hidden"], b["weight"], b["response_ids"], b["rollout_logp"],
                                b["advantages"], b["response_mask"][:, :2])
    assert math.isfinite(fused("pg-is", b)[0].item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["dppo-binary-tv", "dppo-topk-tv", "grpo-clip-higher", "icepop"])
def test_cuda_matches_cpu(name):
    """The fused path on a CUDA device (fp32, TF32 off) against token_stats + policy_loss on the CPU."""
    b = make(name, dtype=torch.float32, seed=3)
    ref_loss, ref_met = reference(name, b, chunk_size=7)
    dev = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
           for k, v in b.items()}
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss, met = fused(name, dev, chunk_size=7)
        got = grads(loss, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    check_metrics(met, ref_met, 1e-5)
    for x, y in zip(got, grads(ref_loss, b)):
        assert x.is_cuda and max_rel(x.cpu(), y) < 1e-5


def test_tile_kernel_choice(monkeypatch):
    """DPPO_TILE_KERNEL: `auto` keeps CPU tensors on the PyTorch path (the Triton kernels are for CUDA devices and,
    under TRITON_INTERPRET=1, for tests/test_triton_tiles.py); a bad value or a `triton` the inputs cannot take is
    named in the error."""
    import dppo.fused
    from dppo import _triton_tiles as tt

    def no_kernel(*a, **k):
        raise AssertionError("the Triton kernel ran on the CPU path")

    monkeypatch.setattr(dppo.fused, "tile_stats", no_kernel)
    b = make("dppo-topk-tv", dtype=torch.float32)
    ref, _ = fused("dppo-topk-tv", b)
    for choice in ("auto", "torch", ""):
        monkeypatch.setenv(tt.KERNEL_ENV, choice)
        assert fused("dppo-topk-tv", b)[0].item() == ref.item()
    monkeypatch.setenv(tt.KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match="DPPO_TILE_KERNEL must be 'auto', 'torch' or 'triton', got 'cuda'"):
        fused("dppo-topk-tv", b)
    monkeypatch.setenv(tt.KERNEL_ENV, "triton")
    if tt.triton is not None:
        with pytest.raises(ValueError, match="supports fp32, bf16 and fp16.*float64"):
            fused("dppo-topk-tv", make("dppo-topk-tv"))
        if not tt.interpreted():
            with pytest.raises(ValueError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
                fused("dppo-topk-tv", b)
    monkeypatch.setattr(tt, "triton", None)  # as where triton is not installed
    with pytest.raises(ImportError, match=r"pip install 'dppo\[triton\]'"):
        fused("dppo-topk-tv", b)
    monkeypatch.setenv(tt.KERNEL_ENV, "auto")
    assert not tt.use_triton(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(tt, "triton", object())  # installed: auto still keeps the PyTorch path until a GPU run checked
    assert not tt.use_triton(torch.device("cuda"), torch.bfloat16)
