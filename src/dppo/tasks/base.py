"""What a task is: prompts with reference answers, a verifiable reward, and a fixed held-out set."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Example", "FixedSetTask", "Task", "step_rng"]


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


class FixedSetTask(Task):
    """A generated task with a held-out set (``self._eval``, drawn by the subclass) and, when ``num_problems`` > 0, a
    fixed training set of that many distinct problems per run seed (the sanity test's fixed problem set, §5.1);
    with 0, every step draws fresh problems. Subclasses implement ``sample(rng)`` (one training example, never a
    held-out prompt) and set ``fixed_salt``, the RNG key of the fixed set (kept per task so existing sets stay the
    same). A step's prompts come from :func:`step_rng` salted with the task's ``name``."""

    fixed_salt = "fixed"

    def __init__(self, num_problems: int):
        if num_problems < 0:
            raise ValueError(f"--task_num_problems must be >= 0, got {num_problems}")
        self.num_problems = num_problems
        self._fixed: dict[int, list[Example]] = {}
        self._eval: list[Example] = []

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def fixed_problems(self, seed: int) -> list[Example]:
        """The fixed training set of ``seed`` (``num_problems`` distinct problems; empty when 0)."""
        if seed not in self._fixed:
            rng = random.Random(f"{self.fixed_salt}/{seed}")
            seen: dict[str, Example] = {}
            while len(seen) < self.num_problems:
                ex = self.sample(rng)
                seen.setdefault(ex.prompt, ex)
            self._fixed[seed] = list(seen.values())
        return self._fixed[seed]

    def train_examples(self, step: int, n: int, seed: int) -> list[Example]:
        rng = step_rng(seed, step, self.name)
        if self.num_problems:
            pool = self.fixed_problems(seed)
            return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
        return [self.sample(rng) for _ in range(n)]

    def eval_examples(self) -> list[Example]:
        return list(self._eval)
