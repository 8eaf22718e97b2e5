"""The HF engine in chunks: bounded batch per forward, and the same rollout tensor for tensor as in one chunk.

Each prompt's G responses are drawn from their own generator (seeded from the caller's), so the chunk size cannot
change a sample; the prompt width stays the batch's, so the forwards see the same padded rows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dppo.engines import HFEngine
from dppo.hf.model import build_char_tokenizer, build_tiny_model
from dppo.rollout import Rollout, SamplingParams, encode_prompts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), hidden_size=64, num_layers=2, num_heads=2).eval()
    ids, mask = encode_prompts(tok, ["12+3=", "7+45=", "1+1=", "99+99=", "5=", "30+4="], use_chat_template=False)
    return tok, model, ids, mask


def fields(ro: Rollout) -> dict:
    return {f.name: getattr(ro, f.name) for f in dataclasses.fields(ro) if getattr(ro, f.name) is not None}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("params", [
    SamplingParams(10, record_topk=4),
    SamplingParams(10, temperature=0.7, top_p=0.9, logit_noise=0.5, record_logp=True),
    SamplingParams(10, temperature=0.0, record_topk=2),
], ids=["plain", "noise-topp-full", "greedy"])
def test_chunked_equals_unchunked(tiny, dtype, params):
    tok, model, ids, mask = tiny
    g = 4

    def run(batch_size):
        eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype=dtype,
                       batch_size=batch_size)
        return eng.generate(ids, mask, params, num_samples=g, generator=torch.Generator().manual_seed(11))

    whole = fields(run(10_000))
    lengths = whole["response_mask"].sum(1)
    if params.temperature:  # chunks end at different steps: the padding path is exercised (greedy never stops)
        assert lengths.min() < lengths.max()
    for bs in (g, 8, 13, 1):  # one group, two, a non-multiple (rounded down to 3 groups), less than a group
        part = fields(run(bs))
        assert part.keys() == whole.keys()
        for k, v in whole.items():
            assert torch.equal(part[k], v), (bs, k)


def test_forward_batch_is_bounded(tiny, monkeypatch):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, batch_size=8)
    rows = []
    forward = eng._forward
    monkeypatch.setattr(eng, "_forward", lambda i, *a: rows.append(i.shape[0]) or forward(i, *a))
    ro = eng.generate(ids, mask, SamplingParams(6), num_samples=4, generator=torch.Generator().manual_seed(0))
    assert ro.response_ids.shape[0] == 24 and max(rows) == 8  # 6 prompts × 4 in chunks of 2 prompts


def test_masked_positions_are_canonical(tiny):
    tok, model, ids, mask = tiny
    eng = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, batch_size=4)
    ro = eng.generate(ids, mask, SamplingParams(10, record_topk=3), num_samples=4,
                      generator=torch.Generator().manual_seed(2))
    off = ~ro.response_mask
    assert off.any()
    assert (ro.response_ids[off] == tok.pad_token_id).all() and (ro.rollout_logp[off] == 0).all()
    assert (ro.rollout_topk_ids[off] == tok.pad_token_id).all()
    assert torch.isneginf(ro.rollout_topk_logp[off]).all()


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        HFEngine(torch.nn.Linear(2, 2), eos_token_id=2, pad_token_id=0, batch_size=0)
