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


# ---- addition-steps: long addition written out column by column -------------------------------------------------


def test_addition_steps_worked_response_by_hand():
    from dppo.tasks.addition_steps import worked_steps

    assert worked_steps(4738, 2959, 4) == "8+9=17,3+5+1=9,7+9=16,4+2+1=7>7697"
    assert worked_steps(999, 999, 3) == "9+9=18,9+9+1=19,9+9+1=19>1998"  # the last carry becomes a digit
    assert worked_steps(100, 200, 3) == "0+0=0,0+0=0,1+2=3>300"
    assert worked_steps(5, 7, 1) == "5+7=12>12"
    # a teacher who always forgets the carry: 8+9=17 leaves no "+1" in the next column, and the sum follows the slip
    assert worked_steps(4738, 2959, 4, 1.0, random.Random(0)) == "8+9=17,3+5=8,7+9=16,4+2=6>6687"


def test_addition_steps_reward_reads_the_final_sum():
    from dppo.tasks import AdditionStepsTask

    t = AdditionStepsTask(digits=3, eval_size=20)
    ex = t.train_examples(0, 1, 0)[0]
    a, b = map(int, ex.prompt.rstrip("=").split("+"))
    assert ex.answer == str(a + b) and 100 <= a <= 999 and 100 <= b <= 999
    good = t.demonstration(ex, random.Random(0), 0.0)
    assert good.endswith(">" + ex.answer) and len(good) >= 20  # tens of tokens
    assert t.reward(ex, good) == 1.0
    assert t.reward(ex, "garbage steps>" + ex.answer) == 1.0  # only the final sum is graded, like a boxed answer
    assert t.reward(ex, good + "0") == 0.0 and t.reward(ex, ex.answer) == 0.0 and t.reward(ex, "") == 0.0
    assert t.reward(ex, "1>2>" + ex.answer) == 1.0 and t.reward(ex, good.replace(">", ">>9")) == 0.0
    assert t.max_new_tokens_hint >= len(t.demonstration(make_task("addition-steps", digits=3).eval_examples()[0],
                                                        random.Random(0), 0.0)) + 1
    assert t.max_new_tokens_hint >= len("9+9=18,9+9+1=19,9+9+1=19>1998") + 1  # the longest response + <eos>


def test_addition_steps_heldout_fixed_set_and_determinism():
    from dppo.tasks import AdditionStepsTask

    t = AdditionStepsTask(digits=3, eval_size=50, num_problems=40)
    held = {e.prompt for e in t.eval_examples()}
    assert len(held) == 50
    fixed = t.fixed_problems(0)
    assert len({e.prompt for e in fixed}) == 40 and not held & {e.prompt for e in fixed}
    train = [e for s in range(20) for e in t.train_examples(s, 16, seed=0)]
    assert {e.prompt for e in train} <= {e.prompt for e in fixed}
    assert t.train_examples(3, 16, 0) == t.train_examples(3, 16, 0) != t.train_examples(3, 16, 1)
    assert t.fixed_problems(1) != fixed
    fresh = AdditionStepsTask(digits=3, eval_size=50)
    assert not held & {e.prompt for s in range(20) for e in fresh.train_examples(s, 16, seed=0)}
    assert len(AdditionStepsTask(digits=1, eval_size=100).eval_examples()) == 20  # at most a fifth of 100 problems
    with pytest.raises(ValueError, match="task_digits"):
        AdditionStepsTask(digits=0)


def test_addition_steps_warmup_learns(tmp_path):
    """The tiny model's supervised warm-up imitates the worked responses: after 300 steps it writes them out in the
    right shape, starting from the right column, and some greedy sums are right (an untrained model does none of it;
    the miniature's 1,500 steps on a bigger model reach ~0.97 greedy, docs/results.md §1)."""
    import torch

    from dppo.engines import HFEngine
    from dppo.hf.model import load_model
    from dppo.rollout import SamplingParams, encode_prompts
    from dppo.run.config import make_config
    from dppo.run.evaluate import decode_responses
    from dppo.run.warmup import warm_start_for

    torch.set_num_threads(1)
    cfg = make_config(task="addition-steps", task_digits=2, eval_per_level=20, hidden=32, layers=2, heads=2,
                      warmup_steps=300, warmup_batch=32, warmup_noise=0.0, cache_dir=str(tmp_path))
    path = warm_start_for(cfg, log=lambda m: None)
    model, tok = load_model(path)
    task = make_task("addition-steps", digits=2, eval_per_level=20)
    exs = task.eval_examples()
    ids, mask = encode_prompts(tok, [e.prompt for e in exs], False)
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ro = engine.generate(ids, mask, SamplingParams(task.max_new_tokens_hint, temperature=0.0))
    texts = decode_responses(tok, ro)
    acc = sum(task.reward(e, t) for e, t in zip(exs, texts)) / len(exs)
    well_formed = sum(t.count(",") == 1 and ">" in t for t in texts) / len(texts)
    first_step = [e.prompt[1] + "+" + e.prompt[4] for e in exs]  # "ab+cd=": the last column is b+d
    copied = sum(t.startswith(f) for f, t in zip(first_step, texts)) / len(texts)
    assert well_formed >= 0.9, texts[:5]
    assert copied >= 0.6, (copied, texts[:5])  # chance: 1/100
    assert acc >= 0.15, (acc, texts[:5])  # chance: ~1/200; an untrained model writes no '>' at all
