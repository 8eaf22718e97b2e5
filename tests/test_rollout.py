"""Rollout correctness: the recorded log μ(a_t) is the log-probability of the sampled token under the distribution
it was actually sampled from (temperature applied, top-k / top-p renormalised), and top-K records match it."""

from __future__ import annotations

import math

import pytest
import torch

from dppo.model import build_char_tokenizer, build_tiny_model, response_stats
from dppo.rollout import HFEngine, SamplingParams, encode_prompts, sampling_logprobs

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
    assert torch.allclose(ro.logp[m], want[m], atol=1e-5)
    top_v, top_i = torch.topk(logq, 5, dim=-1)
    assert torch.equal(ro.topk_ids[m], top_i[m]) and torch.allclose(ro.topk_logp[m], top_v[m], atol=1e-5)
    # the trainer's own statistics (dppo.token_stats path) agree too
    st = response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=temperature,
                        gather_ids=ro.topk_ids)
    assert torch.allclose(st.logp[m], ro.logp[m], atol=1e-5)
    assert torch.allclose(st.gathered_logp[m], ro.topk_logp[m], atol=1e-5)


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
    assert (ro.logp[~ro.response_mask] == 0).all()


def test_bf16_rollout_reproduces_a_small_mismatch(tiny):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="bf16")
    assert not eng.shared and next(eng.model.parameters()).dtype == torch.bfloat16
    ro = eng.generate(ids, mask, SamplingParams(6), num_samples=8, generator=torch.Generator().manual_seed(2))
    st = response_stats(model, ro.input_ids, ro.attention_mask, ro.response_ids, temperature=1.0)
    d = (st.logp.exp() - ro.logp.exp()).abs()[ro.response_mask]
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
