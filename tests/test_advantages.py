"""dppo.advantages.group_advantages against numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dppo import group_advantages


def test_mean_centred_without_std_is_the_default():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    a = group_advantages(r, 4)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))


def test_uniform_group_gets_zero_advantage_under_every_scale():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for scale in ("none", "group-std", "batch-std"):
        a = group_advantages(r, 3, scale=scale)
        assert torch.isfinite(a).all() and (a == 0).all()


def test_group_std_and_batch_std_and_loo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # group mean .25, population std sqrt(.25·.75) = .4330
    std = math.sqrt(0.25 * 0.75)
    torch.testing.assert_close(group_advantages(r, 4, scale="group-std", eps=0.0),
                               torch.tensor([0.75, -0.25, -0.25, -0.25]) / std)
    torch.testing.assert_close(group_advantages(r, 4, baseline="leave-one-out"),
                               torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    r2 = torch.tensor([1.0, 0.0, 3.0, 1.0])
    c = torch.tensor([0.5, -0.5, 1.0, -1.0])
    torch.testing.assert_close(group_advantages(r2, 2, scale="batch-std", eps=0.0), c / c.std(unbiased=False))


@pytest.mark.parametrize(
    "rewards,g,exc,match",
    [
        (torch.ones(6), 4, ValueError, "not a whole number of groups of 4"),
        (torch.ones(4), 1, ValueError, "group_size must be an int >= 2"),
        (torch.ones(4, 1), 2, ValueError, "1-D"),
        (torch.ones(4, dtype=torch.long), 2, TypeError, "rewards must be a floating"),
        (torch.tensor([1.0, float("nan")]), 2, ValueError, "NaN"),
        (torch.ones(0), 2, ValueError, "empty"),
    ],
)
def test_bad_input(rewards, g, exc, match):
    with pytest.raises(exc, match=match):
        group_advantages(rewards, g)
