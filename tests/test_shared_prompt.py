"""The shared-prompt training forward (each group's prompt runs once; its responses attend to that one prompt KV)
gives the same log-probs, losses and gradients as the plain forward, and the trainer's step with it equals the step
without it.

Tolerances: the forward values agree bit for bit here (the same kernels see the same numbers); the gradients agree to
fp32 rounding — transformers runs the RMSNorms in fp32 even for an fp64 model, and the shared path sums the G
responses' gradients into the prompt before that fp32 backward instead of after it (rel 1e-6 in fp64, 2e-5 in fp32).
"""

from __future__ import annotations

import pytest
import torch

from dppo.hf.model import build_tiny_model, can_share_prompts, response_stats
from test_trainer import tiny_cfg


def _batch(B=3, G=4, P=6, T=5, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, V, (B, P), generator=g)
    pmask = torch.ones(B, P, dtype=torch.bool)
    pmask[0, :2] = False  # a left-padded prompt
    prompts[0, :2] = 0
    ids = torch.cat([prompts.repeat_interleave(G, 0), torch.randint(4, V, (B * G, T), generator=g)], 1)
    mask = torch.cat([pmask.repeat_interleave(G, 0), torch.ones(B * G, T, dtype=torch.bool)], 1)
    mask[1, -2:] = False  # a response that ended early
    perm = torch.randperm(B * G, generator=g)  # rows of a group need not be contiguous
    return ids[perm], mask[perm], (torch.arange(B).repeat_interleave(G))[perm], P


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_shared_prompt_forward_equals_the_plain_forward(dtype, rtol):
    torch.manual_seed(0)
    model = build_tiny_model(50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2).to(dtype).eval()
    assert can_share_prompts(model)
    ids, mask, prompt_index, P = _batch()
    resp, rmask = ids[:, P:], mask[:, P:]
    gather = torch.randint(0, 50, (*resp.shape, 3))
    params = list(model.parameters())
    plain = response_stats(model, ids, mask, resp, temperature=0.7, gather_ids=gather)
    shared = response_stats(model, ids, mask, resp, temperature=0.7, gather_ids=gather, prompt_index=prompt_index)
    for a, b in ((plain.logp, shared.logp), (plain.entropy, shared.entropy), (plain.gathered_logp, shared.gathered_logp)):
        torch.testing.assert_close(a[rmask], b[rmask], rtol=rtol, atol=rtol)
    loss = lambda st: (st.logp * rmask).sum() + 0.3 * (st.gathered_logp.sum(-1) * rmask).sum()  # noqa: E731
    ga, gb = torch.autograd.grad(loss(plain), params), torch.autograd.grad(loss(shared), params)
    scale = max(x.abs().max() for x in ga)
    assert max((x - y).abs().max() for x, y in zip(ga, gb)) <= rtol * scale


def test_no_sharing_where_the_model_cannot():
    model = build_tiny_model(50, hidden_size=32, num_layers=1, num_heads=4)
    model.config.layer_types = ["sliding_attention"]
    assert not can_share_prompts(model)


@pytest.mark.parametrize("fused, share", [(False, True), (True, False), (True, True)],
                         ids=["sharing", "fused", "fused+sharing"])
@pytest.mark.parametrize("method", ["dppo-binary-tv", "dppo-topk-kl", "grpo-clip-higher", "icepop", "vaco", "trm"])
def test_trainer_step_is_the_same_on_every_forward_path(tmp_path, monkeypatch, method, fused, share):
    """One RL step through the plain path (response_stats + policy_loss, no sharing) and through the fused loss
    and/or the shared-prompt forward: the same metrics and updated weights to fp32 tolerance."""
    import os

    from dppo.run.trainer import Trainer

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "data"))
    recs, params = [], []
    for f, s in ((False, False), (fused, share)):
        t = Trainer(tiny_cfg(tmp_path / f"{f}{s}", str(tmp_path / "c"), share_prompts=s, fused_loss=f, lr=1e-2,
                             reward="my_rewards:contains_answer", method=method), log=lambda m: None)
        recs.append(t.step(0))
        params.append([p.detach().clone() for p in t.model.parameters()])
    a, b = recs
    assert a["reward"] == b["reward"] and a["grad_norm"] > 0
    for k in a:
        if k.startswith("loss/") or k in ("grad_norm", "entropy") or k.startswith("mismatch/"):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), k
    # Adam normalises every coordinate's step: one whose gradient is ~0 moves by a fraction of lr (1e-2) on fp32
    # rounding noise alone, so the weights are held to 1e-3 of a step
    for x, y in zip(*params):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
