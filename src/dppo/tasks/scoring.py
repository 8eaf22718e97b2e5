"""Scoring a rollout batch with a task's reward, so that a reward function's failure is never a silent NaN.

A reward that raises, or returns NaN, ±inf or something that is not a real number, either stops the run with a
:class:`RewardError` naming the prompt index, the response and the cause (``on_bad="stop"``, the default), or scores
that response 0 and counts it (``on_bad="zero"``; logged as ``reward/bad``).
"""

from __future__ import annotations

import math
import numbers

import torch

from dppo.tasks.base import Example, Task

__all__ = ["RewardError", "score"]


class RewardError(RuntimeError):
    """The task's reward function failed on one response."""


def _check(value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if not isinstance(value, numbers.Real):  # bool counts: True is 1.0
        raise TypeError(f"returned {value!r} ({type(value).__name__}), not a real number")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"returned {v}")
    return v


def score(task: Task, examples: list[Example], responses: list[str], *, on_bad: str = "stop",
          group_size: int = 1) -> tuple[torch.Tensor, int]:
    """``([N] float32 rewards, number of failed responses)``; ``examples[i]`` is the prompt of ``responses[i]``.
    ``group_size`` only makes the error message name the prompt (i // G) besides the response index."""
    if on_bad not in ("stop", "zero"):
        raise ValueError(f"on_bad must be 'stop' or 'zero', got {on_bad!r}")
    out, bad = [], 0
    for i, (ex, text) in enumerate(zip(examples, responses)):
        try:
            out.append(_check(task.reward(ex, text)))
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
            if on_bad == "zero":
                out.append(0.0)
                bad += 1
                continue
            raise RewardError(
                f"the reward function failed on response {i} (prompt {i // group_size}: {ex.prompt[:200]!r}; "
                f"response: {text[:200]!r}): {type(e).__name__}: {e}. Fix the reward, or pass --on_bad_reward zero "
                "to score such responses 0 and count them in reward/bad") from e
    return torch.tensor(out, dtype=torch.float32), bad
