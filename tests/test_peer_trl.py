"""TRL's GRPOTrainer loss and dppo's presets give the same gradient on identical tensors (benchmarks/peer_trl.py).

Skipped when trl is not installed (it is in the ``bench`` extra only).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_trl.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_trl", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peer_trl"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cases(peer):
    return {c[0]: c for c in peer._cases()}


def _grads(peer, case, seed=0, dtype=torch.float64):
    label, trl_kw, method, expect, why, rescale, method2 = case
    kw = dict(trl_kw)
    trainer = peer.tiny_trl_trainer(kw.pop("loss_type"), max_completion_length=16, **kw)
    batch = peer.synthetic_batch(seed=seed, dtype=dtype)
    _, g_trl = peer.trl_grad(trainer, *batch)
    _, g_ours = peer.dppo_grad(method, *batch)
    return batch, g_trl, g_ours


@pytest.mark.parametrize("which", [0, 2, 4])  # grpo (matched agg), dr_grpo vs preset grpo, cispo ε_high=5
def test_matched_cases_agree(peer, which):
    case = peer._cases()[which]
    assert case[3] == "agree"
    batch, g_trl, g_ours = _grads(peer, case)
    assert g_trl.abs().max() > 0
    torch.testing.assert_close(g_trl, g_ours, rtol=1e-12, atol=1e-14)


def test_synthetic_batch_exercises_clip_and_cap(peer):
    logp, rollout_logp, adv, mask = peer.synthetic_batch(seed=0)
    r = torch.exp(logp - rollout_logp)[mask]
    assert (r > 5).any() and (r < 0.8).any() and (r > 1.28).any()
    assert (adv > 0).any() and (adv < 0).any()
    assert (~mask).any()  # ragged lengths, so the aggregations differ


def test_default_grpo_differs_only_by_aggregation(peer):
    case = peer._cases()[5]
    batch, g_trl, g_ours = _grads(peer, case)
    assert (g_trl - g_ours).abs().max() > 1e-3 * g_ours.abs().max()
    torch.testing.assert_close(case[5](g_trl, batch[3]), g_ours.double(), rtol=1e-12, atol=1e-14)


def test_trl_default_cispo_cap_is_epsilon(peer):
    case = peer._cases()[7]
    batch, g_trl, _ = _grads(peer, case)
    _, g_capped = peer.dppo_grad(case[6], *batch)
    torch.testing.assert_close(case[5](g_trl, batch[3]), g_capped.double(), rtol=1e-12, atol=1e-14)
