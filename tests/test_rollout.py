"""Rollout correctness: the recorded log μ(a_t) is the log-probability of the sampled token under the distribution
it was actually sampled from (temperature applied, top-k / top-p renormalised), and top-K records match it."""

from __future__ import annotations

import math

import pytest
import torch

from dppo.hf.model import build_char_tokenizer, build_tiny_model, response_stats
from dppo.engines import HFEngine
from dppo.rollout import SamplingParams, encode_prompts, sampling_logprobs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=2).eval()
    ids, mask = encode_prompts(tok, ["12+3=", "7+45=", "1+1="], use_chat_template=False)
    return tok, model, ids, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_fp32_rollout_logp_equals_fresh_forward(tiny, temperature):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="fp32")
    g = torch.Generator().manual_seed(0)
    ro = eng.generate(ids, mask, SamplingParams(6, temperature=temperature, record_topk=5), num_samples=4,
                      generator=g)
    assert ro.response_ids.shape[0] == 12 and ro.response_mask[:, 0].all()
    # a fresh full forward of the same model, log_softmax(z / T) at the sampled tokens and at the top-5
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask.long(),
                       position_ids=(ro.attention_mask.long().cumsum(-1) - 1).clamp(min=0)).logits
    t = ro.response_ids.shape[1]
    logq = torch.log_softmax(logits[:, -t - 1: -1].float() / temperature, -1)
    want = logq.gather(-1, ro.response_ids[..., None]).squeeze(-1)
    m = ro.response_mask
    assert torch.allclose(ro.rollout_logp[m], want[m], atol=1e-5)
    top_v, top_i = torch.topk(logq, 5, dim=-1)
    assert torch.equal(ro.rollout_topk_ids[m], top_i[m]) and torch.allclose(ro.rollout_topk_logp[m], top_v[m], atol=1e-5)
    # the trainer's own statistics (dppo.token_stats path) agree too
    st = response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=temperature,
                        gather_ids=ro.rollout_topk_ids)
    assert torch.allclose(st.logp[m], ro.rollout_logp[m], atol=1e-5)
    assert torch.allclose(st.gathered_logp[m], ro.rollout_topk_logp[m], atol=1e-5)


def test_responses_stop_at_eos_and_mask(tiny):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ro = eng.generate(ids, mask, SamplingParams(12), num_samples=8, generator=torch.Generator().manual_seed(1))
    eos = tok.eos_token_id
    for row, m, fin in zip(ro.response_ids, ro.response_mask, ro.finished):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix
        assert (row[n:] == tok.pad_token_id).all()
        assert fin == (row[n - 1] == eos) and not (row[: n - 1] == eos).any()
    assert (ro.rollout_logp[~ro.response_mask] == 0).all()


def test_bf16_rollout_reproduces_a_small_mismatch(tiny):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16")
    assert not eng.shared and next(eng.model.parameters()).dtype == torch.bfloat16
    ro = eng.generate(ids, mask, SamplingParams(6), num_samples=8, generator=torch.Generator().manual_seed(2))
    st = response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0)
    d = (st.logp.exp() - ro.rollout_logp.exp()).abs()[ro.response_mask]
    assert 0 < d.mean() < 0.05  # identical weights, different precision: |π − μ| > 0 but small


def test_sync_copies_trainer_weights(tiny):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16")
    w = next(model.parameters())
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # the trainer's update
    try:
        assert not torch.allclose(next(eng.model.parameters()).float(), w, atol=1e-3)
        eng.sync(model)
        assert torch.allclose(next(eng.model.parameters()).float(), w, atol=float(1e-2 * before.abs().max() + 1e-2))
    finally:
        with torch.no_grad():
            w.copy_(before)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.8), (4, 0.5), (1, 1.0)])
def test_truncation_renormalises_over_kept_support(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(5, 12) * 2
    T = 0.8
    lq = sampling_logprobs(logits, T, top_k, top_p)
    kept = torch.isfinite(lq)
    assert torch.allclose(lq.exp().sum(-1), torch.ones(5), atol=1e-6)  # a distribution over the kept tokens
    full = torch.log_softmax(logits / T, -1)
    for r in range(5):
        k = kept[r]
        # log μ on the support = full log-prob − log(kept mass): renormalised, not just masked
        assert torch.allclose(lq[r, k], full[r, k] - torch.logsumexp(full[r, k], 0), atol=1e-6)
        order = torch.argsort(full[r], descending=True)
        n = int(k.sum())
        assert k[order[:n]].all()  # the support is a top set
        if top_k:
            assert n <= top_k
        if top_p < 1:
            # nucleus over the (top-k renormalised) distribution: the smallest prefix whose mass reaches p
            base = full[r, order[:top_k]] if top_k else full[r, order]
            base = (base - torch.logsumexp(base, 0)).exp()
            assert base[: n - 1].sum() < top_p <= base[:n].sum() + 1e-6
    if top_k == 1:
        assert (lq.max(-1).values == 0).all()


def test_truncated_sampling_frequencies_match_recorded_mu():
    """Draws follow exp(log μ): χ²-style check of empirical frequencies on one fixed distribution."""
    torch.manual_seed(0)
    logits = torch.randn(1, 10) * 1.5
    lq = sampling_logprobs(logits, 1.3, top_k=6, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    n = 40000
    draws = torch.multinomial(lq.exp().expand(n, -1), 1, generator=g).squeeze(-1)
    freq = torch.bincount(draws, minlength=10).float() / n
    p = lq.exp()[0]
    assert torch.all(freq[p == 0] == 0)
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq - p).abs() <= 5 * se + 1e-9)


def test_greedy_is_a_point_mass():
    lq = sampling_logprobs(torch.tensor([[0.1, 2.0, -1.0]]), 0.0)
    assert lq[0, 1] == 0 and math.isinf(lq[0, 0]) and lq[0, 0] < 0


# ---- fp32 lm head (--rollout_fp32_head) ------------------------------------------------------------------------


def _prefill_hidden(eng, ids, mask):
    """The engine's own low-precision decoder body on the prompts: last position's hidden state [N, H]."""
    from dppo.engines.hf import _new_cache

    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = eng._body(input_ids=ids, attention_mask=mask.long(), position_ids=pos,
                        **{eng._cache_kw: _new_cache(eng.model)}, use_cache=True)
    return out.last_hidden_state[:, -1]


def test_fp32_head_samples_from_fp32_logits_of_the_low_precision_body(tiny):
    """First response token: log μ = log_softmax(h·Wᵀ) with h the bf16 body's hidden state upcast and W the policy's
    fp32 head weight (not its bf16 rounding), to fp32 rounding; the rounded head gives visibly different log μ."""
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16", fp32_head=True)
    plain = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16")
    ro = eng.generate(ids, mask, SamplingParams(4, record_topk=3), num_samples=2,
                      generator=torch.Generator().manual_seed(3))
    h = _prefill_hidden(eng, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    assert h.dtype == torch.bfloat16
    w = model.get_output_embeddings().weight.detach()
    assert w.dtype == torch.float32
    want = torch.log_softmax(h.float() @ w.T, -1)
    a0 = ro.response_ids[:, 0]
    torch.testing.assert_close(ro.rollout_logp[:, 0], want.gather(-1, a0[:, None])[:, 0], rtol=0, atol=2e-6)
    torch.testing.assert_close(ro.rollout_topk_logp[:, 0], want.topk(3, -1).values, rtol=0, atol=2e-6)
    rounded = torch.log_softmax(plain.model(input_ids=ids.repeat_interleave(2, 0),
                                            attention_mask=mask.repeat_interleave(2, 0).long(),
                                            position_ids=(mask.repeat_interleave(2, 0).long().cumsum(-1) - 1)
                                            .clamp(min=0)).logits[:, -1].float(), -1).detach()
    assert (rounded - want).abs().max() > 100 * 2e-6  # the test above could not pass with a bf16 head


def test_fp32_head_sync_copies_the_policy_head_exactly(tiny):
    """sync refreshes the fp32 head from the policy's own weight (tied to the embedding here), bit for bit, while the
    engine's body gets the bf16 rounding."""
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16", fp32_head=True)
    w = model.get_output_embeddings().weight
    assert w is model.get_input_embeddings().weight  # tied: the head is the embedding
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(torch.linspace(0, 1e-3, w.numel()).view_as(w))  # an update far below bf16 resolution in parts
    try:
        assert not torch.equal(eng._head32[0], w)
        eng.sync(model)
        assert torch.equal(eng._head32[0], w.detach())
        assert torch.equal(eng.model.get_input_embeddings().weight, w.detach().to(torch.bfloat16))
        assert not torch.equal(eng.model.get_input_embeddings().weight.float(), w.detach())
    finally:
        with torch.no_grad():
            w.copy_(before)


def test_fp32_head_lowers_the_mismatch_on_a_wide_vocabulary():
    """V = 4096, peaked logits (untied head, logit std ≈ 4): bf16 logits are rounded to 8 significant bits, so an fp32
    head removes a visible part of |log π − log μ| (benchmarks/rollout_precision.py: −22 % at V = 32,768)."""
    torch.manual_seed(0)
    v, h = 4096, 64
    model = build_tiny_model(v, hidden_size=h, num_layers=1, num_heads=2).eval()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn(v, h) * 4.0 / h**0.5)
    ids = torch.randint(3, v, (8, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    err = {}
    for fh in (False, True):
        eng = HFEngine(model, eos_token_id=2, pad_token_id=0, dtype="bf16", fp32_head=fh)
        ro = eng.generate(ids, mask, SamplingParams(8), num_samples=4, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            st = response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0)
        err[fh] = (st.logp - ro.rollout_logp).abs()[ro.response_mask].mean().item()
    assert 0 < err[True] < 0.9 * err[False], err


def test_fp32_head_refuses_a_model_that_rescales_its_logits(tiny):
    import copy

    tok, model, ids, mask = tiny
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="fp32_head.*soft-capping"):
        HFEngine(capped, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16", fp32_head=True)
    # with an fp32 engine there is nothing to do, so it is accepted (the engine shares the policy)
    assert HFEngine(capped, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, fp32_head=True).shared


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("logit_softcapping", 50.0),
                                          ("logits_scaling", 8.0), ("logit_scale", 0.0625)])
def test_logit_transform_falls_back_to_the_logits_path(tiny, field, value):
    """A model that changes its logits after the head (dppo.hf.logit_transform) is scored through model(...).logits,
    never through h·Wᵀ: the trainer's hidden-state path and the rollout's fp32 head share that one rule."""
    import copy

    from dppo.hf.model import decoder_and_head

    tok, model, ids, mask = tiny
    assert decoder_and_head(model) is not None
    odd = copy.deepcopy(model)
    setattr(odd.config, field, value)
    assert decoder_and_head(odd) is None
    calls = []
    odd.register_forward_hook(lambda mod, inp, out: calls.append(out.logits.shape))
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ro = eng.generate(ids, mask, SamplingParams(4), num_samples=2, generator=torch.Generator().manual_seed(5))
    st = response_stats(odd, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0)
    assert calls, "the full causal-LM forward (logits path) was not used"
    m = ro.response_mask
    torch.testing.assert_close(st.logp[m], ro.rollout_logp[m], rtol=0, atol=1e-5)  # Qwen3 ignores the field: same π


def test_sample_tokens_follows_mu_and_skips_truncated_tokens():
    """Inverse-CDF sampling: with u on a fine grid the token frequencies are μ up to the grid step, and a token
    with μ = 0 (cut by top-k) is never drawn, even for u next to 1."""
    from dppo.rollout import sample_tokens

    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    logmu = sampling_logprobs(logits, 1.0, top_k=3)
    n = 100_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    a = sample_tokens(logmu.expand(n, -1), u)
    freq = torch.bincount(a, minlength=5).double() / n
    torch.testing.assert_close(freq, logmu[0].double().exp(), rtol=0, atol=2.0 / n)
    edge = sample_tokens(logmu.expand(3, -1), torch.tensor([0.0, 1 - 2**-53, 0.999999999]))
    assert torch.isfinite(logmu[0, edge]).all()


def test_per_prompt_seeds_give_the_same_samples_in_any_batch(tiny):
    """A prompt's responses depend on its seed alone: the same as in a batch of other prompts, alone, or in another
    order (what makes a torchrun job's samples independent of the number of processes)."""
    from dppo.rollout import prompt_seeds

    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16")
    sp = SamplingParams(6, record_topk=3, logit_noise=0.1)
    seeds = prompt_seeds(7, 3)
    whole = eng.generate(ids, mask, sp, num_samples=4, seeds=seeds)
    for part in ([2], [1, 0]):
        ro = eng.generate(ids[part], mask[part], sp, num_samples=4, seeds=[seeds[i] for i in part])
        rows = torch.cat([torch.arange(4) + 4 * i for i in part])
        t = ro.response_ids.shape[1]
        assert torch.equal(ro.response_ids, whole.response_ids[rows, :t])
        assert torch.equal(ro.rollout_logp, whole.rollout_logp[rows, :t])
    other = eng.generate(ids, mask, sp, num_samples=4, seeds=prompt_seeds(8, 3))
    assert not torch.equal(other.response_ids, whole.response_ids)  # the seed matters
    with pytest.raises(ValueError, match="one per prompt"):
        eng.generate(ids, mask, sp, num_samples=4, seeds=seeds[:2])
