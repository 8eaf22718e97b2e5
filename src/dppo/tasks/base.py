"""What a task is: prompts with reference answers, a verifiable reward, and a fixed held-out set."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Example", "Task", "step_rng"]


@dataclass(frozen=True)
class Example:
    """One problem. ``prompt`` is the text given to the model (before any chat template); ``answer`` the reference
    the reward checks against; ``level`` a difficulty grade (0 = ungraded) used to break accuracy down."""

    prompt: str
    answer: str
    level: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def step_rng(seed: int, step: int, salt: str = "") -> random.Random:
    """The RNG of training step ``step``: a pure function of (seed, step), so the data a step sees does not depend
    on how the run got there (a resumed run draws exactly the prompts an uninterrupted one would)."""
    return random.Random(f"{salt}/{seed}/{step}")


class Task:
    """Base class. Subclasses set ``name`` and implement the three methods below.

    ``use_chat_template``: whether prompts go through ``tokenizer.apply_chat_template`` when the tokenizer has one
    (natural-language tasks for instruction-tuned models); the default arithmetic task feeds raw text.
    """

    name = "task"
    use_chat_template = True
    max_new_tokens_hint: int | None = None

    def train_examples(self, step: int, n: int, seed: int) -> list[Example]:
        """The ``n`` prompts of training step ``step``, deterministic in (seed, step)."""
        raise NotImplementedError

    def eval_examples(self) -> list[Example]:
        """The fixed held-out set (never used for training)."""
        raise NotImplementedError

    def reward(self, example: Example, response: str) -> float:
        """Verifiable reward of ``response`` (the decoded completion, special tokens removed) for ``example``."""
        raise NotImplementedError

    def correct(self, example: Example, response: str) -> bool:
        """Whether the response counts as correct for accuracy (reward ≥ 1 by default)."""
        return self.reward(example, response) >= 1.0
