"""Long addition written out column by column: responses of tens of tokens whose answer depends on every step.

Prompt ``"4738+2959="``; the response works from the last column to the first, one ``a+b[+1]=s`` step per column
(``+1`` is the carry in), then ``>`` and the sum:

    8+9=17,3+5+1=9,7+9=16,4+2+1=7>7697

Both operands have exactly ``digits`` digits, so every response has 10·d ± d tokens (34 + <eos> for d = 4): the
miniature's stand-in for a chain of thought, in which one bad token early on derails the rest. The reward is 1 iff
the text after the last ``>`` is exactly the sum (the steps are not graded, as a math reward reads only the boxed
answer). *Ours*: the paper trains on MATH / DAPO problems (§5.1, §7); this task only gives a tiny model long,
verifiable responses on a CPU.
"""

from __future__ import annotations

import random

from dppo.tasks.base import Example, FixedSetTask

__all__ = ["AdditionStepsTask", "STEPS_ALPHABET", "worked_steps"]

STEPS_ALPHABET = "0123456789+=,>"


def worked_steps(a: int, b: int, digits: int, p_drop: float = 0.0, rng: random.Random | None = None) -> str:
    """The worked response for ``a+b`` with ``digits``-digit operands. ``p_drop`` > 0: a sloppy teacher who forgets
    each carry with that probability (the step then omits ``+1`` and everything after it follows from the slip)."""
    steps, carry, out = [], 0, []
    for i in range(digits):
        x, y = a // 10**i % 10, b // 10**i % 10
        if carry and rng is not None and rng.random() < p_drop:
            carry = 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        out.append(s % 10)
        carry = s // 10
    total = "".join(map(str, reversed(out + ([carry] if carry else [])))).lstrip("0") or "0"
    return ",".join(steps) + ">" + total


class AdditionStepsTask(FixedSetTask):
    name = "addition-steps"
    fixed_salt = "steps-fixed"
    use_chat_template = False
    alphabet = STEPS_ALPHABET

    def __init__(self, digits: int = 4, eval_size: int = 100, eval_seed: int = 1234, num_problems: int = 0):
        """``digits``: operand length (both operands, leading digit non-zero). ``eval_size`` held-out problems,
        never trained on. ``num_problems`` > 0: training draws from a fixed set of that many problems, drawn once per
        run seed (the sanity test's fixed problem set, §5.1); 0: fresh problems every step."""
        if digits < 1:
            raise ValueError(f"--task_digits must be >= 1, got {digits}")
        super().__init__(num_problems)
        self.digits = digits
        self.max_new_tokens_hint = 10 * digits + 2  # d steps ≤ 8 chars, d−1 commas, '>', ≤ d+1 digits, <eos>
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        space = (10**digits - lo) ** 2
        rng = random.Random(f"steps-eval/{eval_seed}")
        seen: dict[str, Example] = {}
        while len(seen) < min(eval_size, space // 5):  # at most a fifth of the problems are held out
            ex = self._draw(rng)
            seen.setdefault(ex.prompt, ex)
        self._eval = list(seen.values())
        self._eval_prompts = frozenset(seen)

    def _draw(self, rng: random.Random) -> Example:
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b), level=self.digits)

    def sample(self, rng: random.Random) -> Example:
        """One training example, never one of the held-out prompts."""
        while True:
            ex = self._draw(rng)
            if ex.prompt not in self._eval_prompts:
                return ex

    def demonstration(self, example: Example, rng: random.Random, p_drop: float) -> str:
        """The warm-up's target response (:func:`worked_steps`, sloppy with probability ``p_drop`` per carry)."""
        a, b = (int(x) for x in example.prompt.rstrip("=").split("+"))
        return worked_steps(a, b, self.digits, p_drop, rng)

    def reward(self, example: Example, response: str) -> float:
        if ">" not in response:
            return 0.0
        return 1.0 if response.rsplit(">", 1)[1].strip() == example.answer else 0.0
