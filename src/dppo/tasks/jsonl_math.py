"""Math word problems from a JSONL file (one ``{"question": ..., "answer": ...}`` object per line), rewarded by
math-verify: 1 if the last parsable expression of the response (a ``\\boxed{}`` answer first) equals the reference
answer symbolically, else 0."""

from __future__ import annotations

import json
import os
import random

from dppo.tasks.base import Example, Task

__all__ = ["JsonlMathTask", "read_jsonl", "math_verify_reward"]

# Qwen2.5-Math's prompt; the boxed answer is what math-verify extracts first.
DEFAULT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def read_jsonl(path: str) -> list[Example]:
    """Examples from a JSONL file with ``question`` and ``answer`` fields (other fields kept in ``meta``; an integer
    ``level`` field is used as the difficulty grade)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; pass a JSONL file with 'question'/'answer' fields")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{i}: each line needs 'question' and 'answer' fields, got {sorted(row)}")
            level = row.get("level", 0)
            out.append(Example(prompt=str(row["question"]), answer=str(row["answer"]),
                               level=int(level) if isinstance(level, int) else 0, meta=row))
    if not out:
        raise ValueError(f"{path!r} holds no examples")
    return out


def math_verify_reward(answer: str, response: str) -> float:
    """1.0 if math-verify finds the response's answer equal to the reference, else 0.0."""
    from math_verify import parse, verify

    gold = parse(answer) or parse(f"${answer}$")
    pred = parse(response)
    if not gold or not pred:
        return 0.0
    try:
        return 1.0 if verify(gold, pred) else 0.0
    except Exception:  # math-verify raises on a few degenerate expressions; a wrong answer, not a crash
        return 0.0


class JsonlMathTask(Task):
    name = "jsonl"
    use_chat_template = True

    def __init__(self, path: str, eval_path: str | None = None, eval_size: int = 0,
                 template: str = DEFAULT_TEMPLATE, split_seed: int = 0):
        rows = read_jsonl(path)
        if eval_path:
            self._eval = read_jsonl(eval_path)
            self._train = rows
        else:
            # Hold out eval_size rows (or 10 %, at least 1) chosen by a fixed shuffle.
            idx = list(range(len(rows)))
            random.Random(f"split/{split_seed}").shuffle(idx)
            k = eval_size or max(1, len(rows) // 10)
            if k >= len(rows):
                raise ValueError(f"{path!r} has {len(rows)} rows: too few to hold out {k} for evaluation; "
                                 "pass --eval_data or a smaller --eval_size")
            self._eval = [rows[i] for i in idx[:k]]
            self._train = [rows[i] for i in idx[k:]]
        self.template = template
        self._eval = [self._fmt(e) for e in self._eval]
        self._train = [self._fmt(e) for e in self._train]

    def _fmt(self, e: Example) -> Example:
        return Example(prompt=self.template.format(question=e.prompt), answer=e.answer, level=e.level, meta=e.meta)

    def train_examples(self, step: int, n: int, seed: int) -> list[Example]:
        # Epoch-wise shuffles keyed by (seed, epoch): position i of the stream is a pure function of (seed, i).
        out = []
        size = len(self._train)
        for i in range(step * n, step * n + n):
            epoch, j = divmod(i, size)
            perm = self._perm(seed, epoch)
            out.append(self._train[perm[j]])
        return out

    def _perm(self, seed: int, epoch: int) -> list[int]:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != (seed, epoch):
            p = list(range(len(self._train)))
            random.Random(f"epoch/{seed}/{epoch}").shuffle(p)
            self._perm_cache = ((seed, epoch), p)
        return self._perm_cache[1]

    def eval_examples(self) -> list[Example]:
        return list(self._eval)

    def reward(self, example: Example, response: str) -> float:
        return math_verify_reward(example.answer, response)
