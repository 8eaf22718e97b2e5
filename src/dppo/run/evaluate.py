"""Held-out evaluation: Avg@k accuracy at a temperature (and top-p), per difficulty level, plus greedy accuracy.

The paper evaluates Avg@32 at temperature 0.7 and top-p 0.95 (§7): ``--eval_samples 32 --eval_temperature 0.7
--eval_top_p 0.95``. Deterministic in the seed.
"""

from __future__ import annotations

import torch

from dppo.rollout import Rollout, RolloutEngine, SamplingParams, encode_prompts
from dppo.tasks import Task

__all__ = ["evaluate", "decode_responses", "eval_summary"]


def decode_responses(tok, ro: Rollout) -> list[str]:
    return [tok.decode(ids[m].tolist(), skip_special_tokens=True) for ids, m in zip(ro.response_ids, ro.response_mask)]


@torch.no_grad()
def evaluate(engine: RolloutEngine, tok, task: Task, *, max_new_tokens: int, temperature: float, samples: int,
             generator: torch.Generator, top_p: float = 1.0, device: str = "cpu", chat_template: bool = True,
             max_problems: int = 0, greedy: bool = True, batch_size: int = 256) -> dict[str, float]:
    """``eval/accuracy``: mean correctness over ``samples`` samples per problem (Avg@k) at ``temperature`` and
    ``top_p``, overall and per difficulty level (``eval/accuracy_level<N>``); ``eval/greedy_accuracy``; the mean
    response length."""
    exs = task.eval_examples()
    if max_problems:
        exs = exs[:max_problems]
    runs = [("accuracy", SamplingParams(max_new_tokens, temperature=temperature, top_p=top_p), samples)]
    if greedy and temperature != 0:
        runs.append(("greedy_accuracy", SamplingParams(max_new_tokens, temperature=0.0), 1))
    out: dict[str, float] = {}
    for key, sp, k in runs:
        correct: list[float] = []
        levels: list[int] = []
        lengths: list[float] = []
        per = max(1, batch_size // k)
        for i in range(0, len(exs), per):
            chunk = exs[i: i + per]
            ids, mask = encode_prompts(tok, [e.prompt for e in chunk], chat_template and task.use_chat_template,
                                       device)
            ro = engine.generate(ids, mask, sp, num_samples=k, generator=generator)
            texts = decode_responses(tok, ro)
            lengths += ro.response_mask.sum(1).tolist()
            for j, text in enumerate(texts):
                ex = chunk[j // k]
                correct.append(float(task.correct(ex, text)))
                levels.append(ex.level)
        out[f"eval/{key}"] = sum(correct) / len(correct)
        if key == "accuracy":
            out["eval/response_len"] = sum(lengths) / len(lengths)
            for lv in sorted(set(levels)):
                if lv:
                    sel = [c for c, l in zip(correct, levels) if l == lv]
                    out[f"eval/accuracy_level{lv}"] = sum(sel) / len(sel)
    return out


def eval_summary(rows: list[dict]) -> str | None:
    """``held-out accuracy 0.504 (step 0) → 0.779 (step 200); greedy 0.667 → 0.875`` from a run's metric records
    (the whole metrics.jsonl, so a resumed run reports from its true start); None without two evaluations."""
    ev = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    if len(ev) < 2:
        return None
    a, b = ev[0], ev[-1]
    out = f"held-out accuracy {a['eval/accuracy']:.3f} (step {a['step']}) → {b['eval/accuracy']:.3f} (step {b['step']})"
    if "eval/greedy_accuracy" in a and "eval/greedy_accuracy" in b:
        out += f"; greedy {a['eval/greedy_accuracy']:.3f} → {b['eval/greedy_accuracy']:.3f}"
    return out
