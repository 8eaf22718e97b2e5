"""Tasks: prompts + a verifiable reward + a held-out set.

* ``arithmetic`` (default): multi-digit addition graded by digit count, exact-match reward (:mod:`.arithmetic`).
* ``addition-steps``: long addition written out column by column, tens of tokens per response (:mod:`.addition_steps`).
* ``jsonl``: math problems from a JSONL file with ``question``/``answer`` fields, scored by math-verify.
* any task's reward can be replaced by a function given as ``module:function`` with signature
  ``fn(prompt: str, response: str, answer: str) -> float``.

A tiny sample file ships as ``dppo/data/sample_math.jsonl`` (:func:`sample_jsonl_path`).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

from dppo.tasks.addition_steps import AdditionStepsTask
from dppo.tasks.arithmetic import ArithmeticTask
from dppo.tasks.base import Example, Task, step_rng
from dppo.tasks.jsonl_math import JsonlMathTask, math_verify_reward, read_jsonl

__all__ = [
    "Example", "Task", "ArithmeticTask", "AdditionStepsTask", "JsonlMathTask", "CustomRewardTask", "load_reward_fn",
    "make_task", "math_verify_reward", "read_jsonl", "sample_jsonl_path", "step_rng", "TASKS", "TINY_MODEL_TASKS",
]

TASKS = ("arithmetic", "addition-steps", "jsonl")
TINY_MODEL_TASKS = ("arithmetic", "addition-steps")  # tasks the built-in tiny model (run/warmup.py) can learn


def sample_jsonl_path() -> str:
    """Path of the bundled tiny math JSONL (a handful of problems, for tests and a smoke run)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample_math.jsonl")


def load_reward_fn(spec: str) -> Callable[[str, str, str], float]:
    """Import ``module:function`` (the module must be importable: on sys.path or in the working directory)."""
    if ":" not in spec:
        raise ValueError(f"--reward {spec!r}: expected 'module:function', e.g. 'my_rewards:exact_match'")
    mod_name, fn_name = spec.split(":", 1)
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--reward {spec!r}: cannot import module {mod_name!r} ({e})") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn


class CustomRewardTask(Task):
    """Another task's prompts and held-out set with a user reward ``fn(prompt, response, answer) -> float``."""

    def __init__(self, base: Task, fn: Callable[[str, str, str], float], spec: str = "custom"):
        self.base = base
        self.fn = fn
        self.name = f"{base.name}+{spec}"
        self.use_chat_template = base.use_chat_template
        self.max_new_tokens_hint = base.max_new_tokens_hint

    def train_examples(self, step: int, n: int, seed: int) -> list[Example]:
        return self.base.train_examples(step, n, seed)

    def eval_examples(self) -> list[Example]:
        return self.base.eval_examples()

    def reward(self, example: Example, response: str) -> float:
        return self.fn(example.prompt, response, example.answer)  # checked by dppo.tasks.scoring.score

    def correct(self, example: Example, response: str) -> bool:
        return self.base.correct(example, response)


def make_task(name: str, *, data: str | None = None, eval_data: str | None = None, eval_size: int = 0,
              digits: int = 3, eval_per_level: int = 100, reward: str | None = None, num_problems: int = 0) -> Task:
    """The task a config names (see :class:`dppo.run.config.TaskConfig` for the options)."""
    if name == "arithmetic":
        task: Task = ArithmeticTask(max_digits=digits, eval_per_level=eval_per_level, num_problems=num_problems)
    elif name == "addition-steps":
        task = AdditionStepsTask(digits=digits, eval_size=eval_per_level, num_problems=num_problems)
    elif name == "jsonl":
        task = JsonlMathTask(data or sample_jsonl_path(), eval_path=eval_data, eval_size=eval_size)
    else:
        raise ValueError(f"unknown --task {name!r}; choose one of {TASKS}")
    if reward:
        task = CustomRewardTask(task, load_reward_fn(reward), reward)
    return task
