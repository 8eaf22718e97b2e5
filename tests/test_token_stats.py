"""dppo.token_stats against the naive path (materialised logits, fp32/fp64 log_softmax, gather, topk, entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dppo.token_stats import TokenStats, default_chunk_size, token_stats, token_stats_from_logits


def make(n=(3, 11), h=32, v=1000, k=5, dtype=torch.float32, scale=3.0, bias=False, seed=0):
    """Random hidden [*n, h], weight [v, h] (logit std ≈ scale: peaked rows), targets, gather ids, bias."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    tgt = torch.randint(0, v, n, generator=g)
    gids = torch.randint(0, v, (*n, k), generator=g)
    return hidden, weight, b, tgt, gids


def naive(hidden, weight, tgt, *, bias=None, temperature=1.0, topk=0, gids=None, acc=torch.float32):
    """The independent truth: full logits, full log_softmax in ``acc``, gather / topk / entropy."""
    logits = F.linear(hidden, weight, bias).to(acc) / temperature
    lp = logits.log_softmax(-1)
    top = lp.detach().topk(topk, -1) if topk else None
    return TokenStats(
        logp=lp.gather(-1, tgt[..., None])[..., 0],
        entropy=-(lp.exp() * lp).sum(-1),
        topk_ids=top.indices if top else None,
        topk_logp=top.values if top else None,
        gathered_logp=lp.gather(-1, gids) if gids is not None else None,
    )


def weighted_sum(st: TokenStats, u: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((getattr(st, k) * w).sum() for k, w in u.items())


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max abs entry (elementwise rtol is meaningless near 0)."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def assert_topk_equal(ids, logp, ref_ids, ref_logp, tol):
    torch.testing.assert_close(logp, ref_logp, atol=tol, rtol=0)
    # Ids must be equal except where two candidates tie (their log-probs within tol): then either order is right.
    differ = ids != ref_ids
    assert (ref_logp[differ] - logp[differ]).abs().max().item() <= tol if differ.any() else True


# ---------------------------------------------------------------------------------------------------------------
# Exactness in fp32 against the naive path.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk_size,temperature,bias",
    [(None, 1.0, False), (1, 0.6, True), (7, 1.0, True), (4, 1.7, False), (10_000, 0.9, True)],
)
def test_matches_naive_fp32(chunk_size, temperature, bias):
    hidden, weight, b, tgt, gids = make(bias=bias)
    ours = token_stats(hidden, weight, tgt, bias=b, temperature=temperature, topk=8, gather_ids=gids,
                       chunk_size=chunk_size)
    ref = naive(hidden, weight, tgt, bias=b, temperature=temperature, topk=8, gids=gids)
    assert ours.logp.shape == tgt.shape and ours.logp.dtype == torch.float32
    assert ours.topk_ids.shape == (*tgt.shape, 8) and ours.gathered_logp.shape == gids.shape
    for f in ("logp", "entropy", "gathered_logp"):
        torch.testing.assert_close(getattr(ours, f), getattr(ref, f), atol=1e-5, rtol=0, msg=f)
    assert_topk_equal(ours.topk_ids, ours.topk_logp, ref.topk_ids, ref.topk_logp, 1e-5)
    assert ours.topk_logp.grad_fn is None and not ours.topk_ids.is_floating_point()

    g = torch.Generator().manual_seed(1)
    u = {f: torch.randn(getattr(ref, f).shape, generator=g) for f in ("logp", "entropy", "gathered_logp")}
    params = [p for p in (hidden, weight, b) if p is not None]
    got = torch.autograd.grad(weighted_sum(ours, u), params)
    want = torch.autograd.grad(weighted_sum(ref, u), params)
    for name, x, y in zip(("hidden", "weight", "bias"), got, want):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert max_rel(x, y) <= 1e-4, name


@pytest.mark.parametrize("used", [("logp",), ("entropy",), ("gathered_logp",), ("logp", "gathered_logp")])
def test_gradient_of_each_output(used):
    """Only some outputs in the loss (the others get no gradient): each backward branch on its own."""
    hidden, weight, b, tgt, gids = make(n=(40,), v=700, bias=True, seed=3)
    ours = token_stats(hidden, weight, tgt, bias=b, gather_ids=gids, temperature=0.8, chunk_size=9)
    ref = naive(hidden, weight, tgt, bias=b, gids=gids, temperature=0.8)
    g = torch.Generator().manual_seed(2)
    u = {f: torch.randn(getattr(ref, f).shape, generator=g) for f in used}
    for x, y in zip(torch.autograd.grad(weighted_sum(ours, u), (hidden, weight, b)),
                    torch.autograd.grad(weighted_sum(ref, u), (hidden, weight, b))):
        assert max_rel(x, y) <= 1e-4


def test_gradcheck_float64():
    """The custom backward (vocabulary-tiled recompute) against finite differences, fp64, all outputs at once."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    tgt, gids = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6, 3), generator=g)

    def f(h, w, b):  # chunk 2 → 3 token tiles forward, 3-column vocabulary tiles backward
        s = token_stats(h, w, tgt, bias=b, temperature=1.3, gather_ids=gids, chunk_size=2)
        return s.logp, s.entropy, s.gathered_logp

    assert torch.autograd.gradcheck(f, (h, w, b))

    logits = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)

    def fl(z):
        s = token_stats_from_logits(z, tgt, temperature=0.7, gather_ids=gids, chunk_size=4)
        return s.logp, s.entropy, s.gathered_logp

    assert torch.autograd.gradcheck(fl, (logits,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_from_logits_equals_from_hidden(dtype):
    """Same statistics from logits as from (hidden, weight, bias).

    The two paths compute the logits with GEMMs of different shapes (5-token tiles vs one [N, H] x [H, V]), and the
    BLAS may sum the H products in a different order (it even picks kernels by pointer alignment, so the order can
    change between processes). Each logit z/T can then differ by a few ulp of max|z/T|, and log-softmax passes that
    on, so the tolerance is 4 ulp of max|z/T| (≈ 1e-5 here in fp32, ≈ 2e-14 in fp64), not a fixed 1e-6.
    """
    hidden, weight, b, tgt, gids = make(bias=True, seed=5, dtype=dtype)
    temperature = 0.7
    kw = dict(temperature=temperature, topk=6, gather_ids=gids, chunk_size=5)
    a = token_stats(hidden, weight, tgt, bias=b, **kw)
    logits = F.linear(hidden, weight, b)
    c = token_stats_from_logits(logits, tgt, **kw)
    atol = 4 * torch.finfo(dtype).eps * (logits.detach() / temperature).abs().max().item()
    for f in ("logp", "entropy", "topk_logp", "gathered_logp"):
        torch.testing.assert_close(getattr(c, f), getattr(a, f), atol=atol, rtol=0, msg=f)
    assert torch.equal(c.topk_ids, a.topk_ids)
    g = torch.Generator().manual_seed(1)
    u = {f: torch.randn(getattr(a, f).shape, generator=g, dtype=dtype) for f in ("logp", "entropy", "gathered_logp")}
    ga = torch.autograd.grad(weighted_sum(a, u), (hidden, weight, b))
    gc = torch.autograd.grad(weighted_sum(c, u), (hidden, weight, b))
    for x, y in zip(gc, ga):
        assert max_rel(x, y) <= (1e-5 if dtype == torch.float32 else 1e-12)
    # The caller's logits are read, never modified in place.
    torch.testing.assert_close(logits, F.linear(hidden, weight, b))


def test_leading_dims_and_optional_fields():
    hidden, weight, _, tgt, _ = make(n=(2, 3, 5), seed=7)
    s = token_stats(hidden, weight, tgt, entropy=False)
    assert s.logp.shape == (2, 3, 5) and s.entropy is None and s.topk_ids is None and s.gathered_logp is None
    flat = token_stats(hidden.reshape(-1, hidden.shape[-1]), weight, tgt.reshape(-1))
    torch.testing.assert_close(s.logp.reshape(-1), flat.logp)
    one = token_stats(hidden[0, 0, 0], weight, tgt[0, 0, 0], topk=3)  # a single token: [H] → scalar
    assert one.logp.shape == () and one.topk_ids.shape == (3,)
    full = token_stats(hidden, weight, tgt, topk=weight.shape[0])  # K = V is allowed: the whole distribution
    torch.testing.assert_close(full.topk_logp.exp().sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)


def test_empty_batch():
    hidden, weight, _, _, _ = make(n=(0,))
    s = token_stats(hidden, weight, torch.zeros(0, dtype=torch.long), topk=2)
    assert s.logp.shape == (0,) and s.topk_ids.shape == (0, 2)
    gh, gw = torch.autograd.grad(s.logp.sum() + s.entropy.sum(), (hidden, weight), allow_unused=True)
    assert gh.shape == (0, 32) and (gw is None or not gw.abs().any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """bf16/fp16 hidden and weight: GEMM in the input dtype, log-sum-exp in fp32; outputs fp32.

    Both paths see logits rounded to the input dtype (relative step u = 2⁻⁸ for bf16, 2⁻¹¹ for fp16), so against
    the fp64 truth of the same (rounded) inputs each log-prob may be off by up to ~2·u·max|z| (|Δlogp| ≤ 2 max|Δz|);
    we assert that bound, and that ours agrees with the naive path (same rounded logits) to 1/8 of one step.
    Gradients: bf16 [N,V]×[V,H] products carry relative error of a few u; bounded by 8u of the max entry and by
    the naive path's own error + 2u (seen: 0.011 vs 0.011 for bf16, 0.0016 vs 0.0015 for fp16).
    """
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    hidden, weight, b, tgt, gids = make(n=(64,), h=64, v=4096, dtype=dtype, bias=True, seed=11)
    ours = token_stats(hidden, weight, tgt, bias=b, gather_ids=gids, topk=4, chunk_size=24)
    ref_lp = naive(hidden, weight, tgt, bias=b, gids=gids, topk=4)  # naive: rounded logits, fp32 softmax
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, b))
    truth = naive(h64, w64, tgt, bias=b64, gids=gids, topk=4, acc=torch.float64)
    zmax = F.linear(h64, w64, b64).abs().max().item()
    assert ours.logp.dtype == torch.float32 and ours.entropy.dtype == torch.float32
    for f in ("logp", "gathered_logp", "entropy"):
        err = (getattr(ours, f).double() - getattr(truth, f)).abs().max().item()
        assert err <= 2 * u * zmax, (f, err, 2 * u * zmax)
        # Same rounded logits as the naive path, so the two agree far inside one logit ulp (1e-5 seen on CPU).
        assert (getattr(ours, f) - getattr(ref_lp, f)).abs().max().item() <= u * zmax / 8, f
    g = torch.Generator().manual_seed(4)
    w8 = {f: torch.randn(getattr(truth, f).shape, generator=g) for f in ("logp", "entropy", "gathered_logp")}
    got = torch.autograd.grad(weighted_sum(ours, w8), (hidden, weight, b))
    got_naive = torch.autograd.grad(weighted_sum(ref_lp, w8), (hidden, weight, b))
    want = torch.autograd.grad(weighted_sum(truth, {k: x.double() for k, x in w8.items()}), (h64, w64, b64))
    for name, x, xn, y in zip(("hidden", "weight", "bias"), got, got_naive, want):
        assert x.dtype == dtype
        assert max_rel(x, y) <= 8 * u, (name, max_rel(x, y))
        assert max_rel(x, y) <= max_rel(xn, y) + 2 * u, (name, max_rel(x, y), max_rel(xn, y))


def test_bf16_accumulates_in_fp32():
    """A near-uniform row over V = 8192 bf16 logits: a bf16 log-sum-exp would be off by ~1e-2; fp32 is exact."""
    v, h = 8192, 16
    hidden = torch.full((2, h), 0.01, dtype=torch.bfloat16)
    weight = torch.full((v, h), 0.01, dtype=torch.bfloat16)
    s = token_stats(hidden, weight, torch.tensor([0, 5]), chunk_size=1)
    torch.testing.assert_close(s.logp, torch.full((2,), -torch.log(torch.tensor(float(v)))), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.entropy, torch.full((2,), torch.log(torch.tensor(float(v)))), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Memory: no O(N·V) tensor, forward or backward.
# ---------------------------------------------------------------------------------------------------------------


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_no_tensor_of_size_n_times_v(entropy_grad):
    """Every tensor any op creates during forward + backward is at most one tile (chunk_size · V elements).

    N·V = 240,000 here; a tile is 20·V = 24,000; the gradient dW is V·H = 4,800 (H small on purpose).
    """
    n, h, v, chunk = 200, 4, 1200, 20
    hidden, weight, b, tgt, gids = make(n=(n,), h=h, v=v, k=20, bias=True)
    mode = _MaxNumel()
    with mode:
        s = token_stats(hidden, weight, tgt, bias=b, gather_ids=gids, chunk_size=chunk)
        loss = s.logp.sum() + s.gathered_logp.sum() + (s.entropy.sum() if entropy_grad else 0)
        loss.backward()
    assert mode.max_numel <= chunk * v, (mode.max_numel, mode.op)
    assert hidden.grad is not None and weight.grad is not None and b.grad is not None

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_stats(hidden, weight, tgt, bias=b, gather_ids=gids, topk=3, chunk_size=chunk)
    assert max(saved) <= max(v * h, n * 20), saved  # inputs and O(N) results only


def test_default_chunk_size():
    assert default_chunk_size(151_936) == 220  # 128 MB of fp32 logits per tile at the Qwen vocabulary
    assert default_chunk_size(1000) >= 30_000
    assert default_chunk_size(10**9) == 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input: named errors.
# ---------------------------------------------------------------------------------------------------------------


def _bad_cases():
    hidden, weight, b, tgt, gids = make(n=(4,), h=8, v=50)
    d = dict(hidden=hidden, weight=weight, target_ids=tgt)
    return [
        (dict(d, target_ids=torch.tensor([0, 1, 2, 50])), ValueError, "target_ids.*outside"),
        (dict(d, target_ids=torch.tensor([0, -1, 2, 3])), ValueError, "target_ids.*outside"),
        (dict(d, target_ids=tgt.float()), TypeError, "target_ids"),
        (dict(d, target_ids=tgt[:3]), ValueError, "target_ids.*shape"),
        (dict(d, hidden=torch.randn(4, 9)), ValueError, "hidden.*H=9"),
        (dict(d, hidden=torch.ones(4, 8, dtype=torch.long)), TypeError, "hidden.*floating"),
        (dict(d, weight=weight.long()), TypeError, "weight.*floating"),
        (dict(d, weight=weight.double()), TypeError, "hidden is torch.float32 but weight"),
        (dict(d, weight=weight[None]), ValueError, "weight must be \\[V, H\\]"),
        (dict(d, hidden=[[0.0] * 8]), TypeError, "hidden must be a torch.Tensor"),
        (dict(d, temperature=0.0), ValueError, "temperature"),
        (dict(d, temperature=-1.0), ValueError, "temperature"),
        (dict(d, temperature=float("nan")), ValueError, "temperature"),
        (dict(d, temperature="1"), TypeError, "temperature"),
        (dict(d, topk=51), ValueError, "topk.*V=50"),
        (dict(d, topk=-1), ValueError, "topk"),
        (dict(d, topk=2.0), TypeError, "topk"),
        (dict(d, gather_ids=torch.full((4, 3), 50)), ValueError, "gather_ids.*outside"),
        (dict(d, gather_ids=gids.float()), TypeError, "gather_ids"),
        (dict(d, gather_ids=gids[:, 0]), ValueError, "gather_ids.*shape"),
        (dict(d, bias=torch.zeros(49)), ValueError, "bias"),
        (dict(d, bias=torch.zeros(50, dtype=torch.long)), TypeError, "bias"),
        (dict(d, chunk_size=0), ValueError, "chunk_size"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", _bad_cases())
def test_bad_input(kwargs, exc, match):
    kwargs = dict(kwargs)
    args = (kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("target_ids"))
    with pytest.raises(exc, match=match):
        token_stats(*args, **kwargs)


def test_bad_input_from_logits():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="target_ids.*outside"):
        token_stats_from_logits(logits, torch.tensor([0, 10, 1]))
    with pytest.raises(TypeError, match="logits.*floating"):
        token_stats_from_logits(logits.long(), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="topk"):
        token_stats_from_logits(logits, torch.tensor([0, 1, 1]), topk=11)
    with pytest.raises(ValueError, match="temperature"):
        token_stats_from_logits(logits, torch.tensor([0, 1, 1]), temperature=0)


# ---------------------------------------------------------------------------------------------------------------
# Property test: random shapes, chunkings and temperatures.
# ---------------------------------------------------------------------------------------------------------------


def test_random_shapes_property():
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=25, deadline=None, derandomize=True)
    @hyp.given(n=st.integers(1, 30), v=st.integers(2, 300), chunk=st.integers(1, 40),
               temp=st.floats(0.3, 3.0), k=st.integers(0, 4), seed=st.integers(0, 1000))
    def check(n, v, chunk, temp, k, seed):
        hidden, weight, _, tgt, gids = make(n=(n,), h=6, v=v, k=3, seed=seed)
        ours = token_stats(hidden, weight, tgt, temperature=temp, topk=min(k, v), gather_ids=gids, chunk_size=chunk)
        ref = naive(hidden, weight, tgt, temperature=temp, topk=min(k, v), gids=gids)
        for f in ("logp", "entropy", "gathered_logp"):
            torch.testing.assert_close(getattr(ours, f), getattr(ref, f), atol=1e-5, rtol=0)
        if k:
            assert_topk_equal(ours.topk_ids, ours.topk_logp, ref.topk_ids, ref.topk_logp, 1e-5)
        u = {"logp": torch.ones(n), "entropy": torch.full((n,), 0.5), "gathered_logp": torch.ones(n, 3)}
        for x, y in zip(torch.autograd.grad(weighted_sum(ours, u), (hidden, weight)),
                        torch.autograd.grad(weighted_sum(ref, u), (hidden, weight))):
            assert max_rel(x, y) <= 1e-4

    check()


# ---------------------------------------------------------------------------------------------------------------
# Real models: tiny Qwen3 (tied embeddings) and Llama (untied) built from config.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("llama", False)])
def test_transformers_models(arch, tied):
    transformers = pytest.importorskip("transformers")
    from dppo.hf.heads import causal_lm_token_stats, final_hidden_states, lm_head

    torch.manual_seed(0)
    h, v = 64, 1000
    cfg = transformers.AutoConfig.for_model(
        arch, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=h // 4, vocab_size=v, tie_word_embeddings=tied,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    weight, bias = lm_head(model)
    assert (weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, v, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row

    hidden = final_hidden_states(model, ids, mask)
    out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(F.linear(hidden, weight, bias), out.logits, atol=1e-5, rtol=1e-5)

    gather = torch.randint(0, v, (2, 11, 20))
    s = causal_lm_token_stats(model, ids, mask, temperature=0.9, topk=20, gather_ids=gather, chunk_size=5)
    ref = naive(out.logits[:, :-1], torch.eye(v), ids[:, 1:], temperature=0.9, topk=20, gids=gather)
    for f in ("logp", "entropy", "gathered_logp"):
        torch.testing.assert_close(getattr(s, f), getattr(ref, f), atol=1e-5, rtol=0, msg=f)
    assert_topk_equal(s.topk_ids, s.topk_logp, ref.topk_ids, ref.topk_logp, 1e-5)

    # Gradients into every model parameter (the tied embedding gets both its uses) match the logits path.
    keep = mask[:, 1:].float()
    u = {"logp": torch.randn(2, 11) * keep, "entropy": torch.randn(2, 11) * keep,
         "gathered_logp": torch.randn(2, 11, 20) * keep[..., None]}
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(weighted_sum(s, u), params)
    want = torch.autograd.grad(weighted_sum(ref, u), params)
    for p, x, y in zip(params, got, want):
        assert max_rel(x, y) <= 1e-4, tuple(p.shape)


def test_lm_head_refuses_logit_transforms():
    transformers = pytest.importorskip("transformers")
    from dppo.hf.heads import lm_head

    cfg = transformers.AutoConfig.for_model(
        "qwen3", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=50,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        lm_head(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    hidden, weight, b, tgt, gids = make(n=(50,), bias=True)
    cpu = token_stats(hidden, weight, tgt, bias=b, topk=5, gather_ids=gids, chunk_size=7)
    dev = [x.detach().cuda().requires_grad_() for x in (hidden, weight, b)]
    gpu = token_stats(dev[0], dev[1], tgt.cuda(), bias=dev[2], topk=5, gather_ids=gids.cuda(), chunk_size=7)
    for f in ("logp", "entropy", "topk_logp", "gathered_logp"):
        torch.testing.assert_close(getattr(gpu, f).cpu(), getattr(cpu, f), atol=1e-5, rtol=0)
    (gpu.logp.sum() + gpu.entropy.sum()).backward()
    (cpu.logp.sum() + cpu.entropy.sum()).backward()
    for x, y in zip(dev, (hidden, weight, b)):
        assert max_rel(x.grad.cpu(), y.grad) <= 1e-4
