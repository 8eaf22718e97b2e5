"""The default task: multi-digit addition, graded by difficulty, with an exact reward.

Prompt ``"47+385="``, reference ``"432"``; level d ∈ {1, …, max_digits} draws both operands with up to d digits
(level 1: single digits, level 3: up to 999+999). Reward 1 if the response is exactly the sum, else 0: verifiable,
binary, like the paper's math rewards. The held-out set is a fixed sample per level, disjoint from training
(training prompts are rejected if they are in it).

The task is small enough that a 1 M-parameter transformer learns it from scratch on a CPU in a few minutes, and
hard enough (carries across three digits) that a short supervised warm-up leaves plenty for RL to fix.
"""

from __future__ import annotations

import random

from dppo.tasks.base import Example, FixedSetTask

__all__ = ["ArithmeticTask", "ALPHABET"]

ALPHABET = "0123456789+="


class ArithmeticTask(FixedSetTask):
    name = "arithmetic"
    use_chat_template = False
    alphabet = ALPHABET

    def __init__(self, max_digits: int = 3, eval_per_level: int = 100, eval_seed: int = 1234, num_problems: int = 0):
        """``num_problems`` > 0: training draws from a fixed set of that many problems (drawn once per run seed,
        disjoint from the held-out set), like the fixed problem set of the paper's sanity test (§5.1); 0: fresh
        problems every step."""
        if max_digits < 1:
            raise ValueError(f"--task_digits must be >= 1, got {max_digits}")
        super().__init__(num_problems)
        self.max_digits = max_digits
        self.max_new_tokens_hint = max_digits + 2  # the sum has at most max_digits+1 digits, then <eos>
        rng = random.Random(f"eval/{eval_seed}")
        seen: set[str] = set()
        for level in range(1, max_digits + 1):
            # at most a fifth of a level's problems are held out (level 1 has only 10·10 of them)
            space = (10**level - (0 if level == 1 else 10 ** (level - 1))) * 10**level
            want = min(eval_per_level, space // 5)
            got = 0
            tries = 0
            while got < want and tries < 100 * want:
                tries += 1
                ex = self._draw(rng, level)
                if ex.prompt in seen:
                    continue
                seen.add(ex.prompt)
                self._eval.append(ex)
                got += 1
        self._eval_prompts = frozenset(seen)

    @staticmethod
    def _draw(rng: random.Random, level: int) -> Example:
        hi = 10**level - 1
        lo = 0 if level == 1 else 10 ** (level - 1)
        a = rng.randint(lo, hi)  # the first operand has exactly `level` digits (level 1: 0–9)
        b = rng.randint(0, hi)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b), level=level)

    def sample(self, rng: random.Random) -> Example:
        """One training example, never one of the held-out prompts."""
        while True:
            ex = self._draw(rng, rng.randint(1, self.max_digits))
            if ex.prompt not in self._eval_prompts:
                return ex

    @staticmethod
    def sloppy_answer(example: Example, rng: random.Random, p_drop: float) -> str:
        """A demonstration from a sloppy teacher: column addition that forgets each carry with probability
        ``p_drop`` (0 = the exact sum). The warm-up imitates it, so RL starts from a policy that knows how to add
        but carries only sometimes: a systematic error that only the verifiable reward can remove."""
        a, b = (int(x) for x in example.prompt.rstrip("=").split("+"))
        digits, carry = [], 0
        while a or b or carry:
            s = a % 10 + b % 10 + carry
            digits.append(s % 10)
            carry = s // 10 if rng.random() >= p_drop else 0
            a //= 10
            b //= 10
        return "".join(map(str, reversed(digits))).lstrip("0") or "0"

    def demonstration(self, example: Example, rng: random.Random, p_drop: float) -> str:
        """The warm-up's target response: :meth:`sloppy_answer`."""
        return self.sloppy_answer(example, rng, p_drop)

    def reward(self, example: Example, response: str) -> float:
        return 1.0 if response.strip() == example.answer else 0.0
