"""The trainer *learns*: on a task a tiny model masters in seconds (put '7' first: tests/data/my_rewards.py), the
training reward rises, for a divergence-masked method and a ratio-clipped one. A sign error anywhere between the
rollout and the update (advantages, the loss, the log-prob offsets) makes the reward fall instead, and fails here."""

from __future__ import annotations

import os

import pytest

from test_trainer import tiny_cfg

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("method", ["dppo-binary-tv", "grpo-clip-higher"])
def test_reward_rises(tmp_path, method, monkeypatch):
    from dppo.run.loop import train

    monkeypatch.syspath_prepend(DATA)
    rows = train(tiny_cfg(tmp_path / method, str(tmp_path / "cache"), method=method, reward="my_rewards:starts_with_seven",
                          steps=12, prompts_per_step=8, group_size=8, lr=1e-2, eval_every=0, eval_max_problems=4,
                          ckpt_every=0, plot=False, tensorboard=False),
                 log=lambda m: None)
    rewards = [r["reward"] for r in rows if "reward" in r]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3 and last > 0.6, rewards
