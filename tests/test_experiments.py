"""The figure scripts of experiments/ open up the trainer's first step (experiments/first_batch.py); they have no
runs in CI, so this checks on a tiny job that their entry points still match the trainer: the rollout records μ's
whole distribution, the advantages are the trainer's, and the trainer's own updates move the policy."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--warmup_steps", "20", "--warmup_batch", "32",
        "--task", "arithmetic", "--task_digits", "2", "--eval_per_level", "5", "--prompts_per_step", "4",
        "--group_size", "4", "--minibatches", "2", "--threads", "1", "--no-progress", "--lr", "1e-2"]


def test_first_batch_and_update(tmp_path):
    from first_batch import first_batch, make_trainer, policy_logits, update

    # an empty --config replaces the miniature (make_trainer's default) by the tiny job of the flags
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("")
    tr = make_trainer(["--config", str(cfg), *TINY, "--cache_dir", str(tmp_path), "--rollout_dtype", "fp32"], "pg-is")
    b = first_batch(tr)
    ro = b["ro"]
    m = ro.response_mask
    full = ro.rollout_full_logp  # [N, T, V] log μ, recorded at sampling time
    assert full.shape[:2] == m.shape and full.shape[-1] == len(tr.tok)
    got = full.gather(-1, ro.response_ids[..., None])[..., 0]
    torch.testing.assert_close(got[m], ro.rollout_logp[m], atol=1e-5, rtol=0)  # μ(a_t) is the recorded row's entry
    assert b["adv"].shape == (m.shape[0],)
    before = policy_logits(tr, ro).log_softmax(-1)
    torch.testing.assert_close(before[m], full[m], atol=1e-4, rtol=0)  # fp32 engine: π = μ before any update
    # a 20-step warm-up scores 0 everywhere (Â = 0: no update); a spread of advantages makes the updates move π
    b["adv"] = torch.linspace(-1.0, 1.0, m.shape[0])
    update(tr, b)
    after = policy_logits(tr, ro).log_softmax(-1)
    assert (after[m] - before[m]).abs().max() > 1e-4  # the trainer's updates moved the policy
