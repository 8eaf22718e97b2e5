"""Tasks: exact rewards, disjoint held-out sets, determinism of the data stream, math-verify, custom rewards."""

from __future__ import annotations

import os
import random

import pytest

from dppo.tasks import ArithmeticTask, CustomRewardTask, JsonlMathTask, load_reward_fn, make_task, sample_jsonl_path

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_arithmetic_reward_is_exact():
    t = ArithmeticTask(max_digits=2)
    ex = t.train_examples(0, 1, 0)[0]
    a, b = map(int, ex.prompt.rstrip("=").split("+"))
    assert ex.answer == str(a + b)
    assert t.reward(ex, ex.answer) == 1.0 and t.reward(ex, ex.answer + "0") == 0.0 and t.reward(ex, "") == 0.0


def test_arithmetic_levels_heldout_and_determinism():
    t = ArithmeticTask(max_digits=3, eval_per_level=50)
    ev = t.eval_examples()
    assert {e.level for e in ev} == {1, 2, 3}
    assert sum(e.level == 1 for e in ev) == 20  # at most a fifth of the 100 single-digit problems
    held = {e.prompt for e in ev}
    train = [e for s in range(50) for e in t.train_examples(s, 16, seed=0)]
    assert not held & {e.prompt for e in train}
    assert t.train_examples(7, 16, 0) == t.train_examples(7, 16, 0) != t.train_examples(7, 16, 1)
    for e in train[:50]:
        a, b = map(int, e.prompt.rstrip("=").split("+"))
        assert len(str(a)) == e.level


def test_sloppy_teacher():
    t = ArithmeticTask(max_digits=3)
    rng = random.Random(0)
    exs = t.train_examples(0, 200, 0)
    assert all(t.sloppy_answer(e, rng, 0.0) == e.answer for e in exs)
    wrong = [t.sloppy_answer(e, rng, 1.0) != e.answer for e in exs]
    assert 0.2 < sum(wrong) / len(wrong) < 0.9  # only problems with a carry go wrong


def test_jsonl_math_task_with_math_verify():
    t = JsonlMathTask(sample_jsonl_path(), eval_size=4)
    assert len(t.eval_examples()) == 4 and len(t.train_examples(0, 5, 0)) == 5
    ex = next(e for e in t.train_examples(0, 12, 0) + t.eval_examples() if e.answer == "\\frac{3}{4}")
    assert t.reward(ex, "so the answer is \\boxed{\\frac{3}{4}}") == 1.0
    assert t.reward(ex, "\\boxed{0.75}") == 1.0  # symbolic equality, not string match
    assert t.reward(ex, "\\boxed{4/3}") == 0.0 and t.reward(ex, "no idea") == 0.0
    # the stream covers every training row once per epoch, in a seed-dependent order
    n = len(t._train)
    epoch = t.train_examples(0, n, seed=3)
    assert sorted(e.prompt for e in epoch) == sorted(e.prompt for e in t._train)


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "1+1", "a": "2"}\n')
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        JsonlMathTask(str(bad))
    with pytest.raises(FileNotFoundError):
        JsonlMathTask(str(tmp_path / "missing.jsonl"))


def test_custom_reward(monkeypatch):
    monkeypatch.syspath_prepend(DATA)
    fn = load_reward_fn("my_rewards:contains_answer")
    t = make_task("jsonl", data=os.path.join(DATA, "math_tiny.jsonl"), reward="my_rewards:contains_answer")
    assert isinstance(t, CustomRewardTask)
    ex = t.eval_examples()[0]
    assert t.reward(ex, f"it is {ex.answer}") == 1.0 == fn("", ex.answer, ex.answer)
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("no_colon")
    with pytest.raises(ValueError, match="no function"):
        load_reward_fn("my_rewards:nope")
