"""Held-out evaluation: Avg@k accuracy at a temperature (and top-p), per difficulty level, plus greedy accuracy.

The paper evaluates Avg@32 at temperature 0.7 and top-p 0.95 (§7): ``--eval_samples 32 --eval_temperature 0.7
--eval_top_p 0.95``. Deterministic in the seed, whatever the batch size or the number of processes.
"""

from __future__ import annotations

import torch

from dppo.rollout import Rollout, RolloutEngine, SamplingParams, encode_prompts, prompt_seeds
from dppo.tasks import Task

__all__ = ["evaluate", "decode_responses", "eval_summary"]


def decode_responses(tok, ro: Rollout) -> list[str]:
    return [tok.decode(ids[m].tolist(), skip_special_tokens=True) for ids, m in zip(ro.response_ids, ro.response_mask)]


@torch.no_grad()
def evaluate(engine: RolloutEngine, tok, task: Task, *, max_new_tokens: int, temperature: float, samples: int,
             seed: int, top_p: float = 1.0, device: str = "cpu", chat_template: bool = True,
             max_problems: int = 0, greedy: bool = True, batch_size: int = 256, dist=None) -> dict[str, float]:
    """``eval/accuracy``: mean correctness over ``samples`` samples per problem (Avg@k) at ``temperature`` and
    ``top_p``, overall and per difficulty level (``eval/accuracy_level<N>``); ``eval/greedy_accuracy``; the mean
    response length. Problem i's samples come from its own seed (:func:`dppo.rollout.prompt_seeds` of ``seed``), so
    the figures do not depend on ``batch_size``; with ``dist`` (:mod:`dppo.run.distributed`) each process samples
    every W-th problem and the results are gathered in problem order: the same figures as one process."""
    exs = task.eval_examples()
    if max_problems:
        exs = exs[:max_problems]
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    mine = list(range(rank, len(exs), world))
    seeds = prompt_seeds(seed, len(exs))
    runs = [("accuracy", SamplingParams(max_new_tokens, temperature=temperature, top_p=top_p), samples)]
    if greedy and temperature != 0:
        runs.append(("greedy_accuracy", SamplingParams(max_new_tokens, temperature=0.0), 1))
    out: dict[str, float] = {}
    for key, sp, k in runs:
        per_problem = []  # (index, [correct] × k, [length] × k)
        per = max(1, batch_size // k)
        if dist is not None:  # [dist] sampling alone: bounded by --dist_phase_timeout, not --dist_timeout
            dist.enter("evaluation", dist.step)
        for i in range(0, len(mine), per):
            chunk = mine[i: i + per]
            ids, mask = encode_prompts(tok, [exs[j].prompt for j in chunk], chat_template and task.use_chat_template,
                                       device)
            ro = engine.generate(ids, mask, sp, num_samples=k, seeds=[seeds[j] for j in chunk])
            texts = decode_responses(tok, ro)
            lengths = ro.response_mask.sum(1).tolist()
            for c, j in enumerate(chunk):
                rows = range(c * k, (c + 1) * k)
                per_problem.append((j, [float(task.correct(exs[j], texts[r])) for r in rows],
                                    [lengths[r] for r in rows]))
        if dist is not None:
            dist.arrive("evaluation")
            per_problem = sorted(x for part in dist.gather_objects(per_problem) for x in part)
        correct = [c for _, cs, _ in per_problem for c in cs]
        levels = [exs[j].level for j, cs, _ in per_problem for _ in cs]
        lengths = [n for _, _, ns in per_problem for n in ns]
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
