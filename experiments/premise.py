"""The sanity test's premise (§5.1: a fixed problem set the initial model already solves) and the miniature's long
tail, measured per seed on the warm-up models the runs of docs/results.md §1 start from.

For each seed: greedy and T = 1 accuracy of the warm-up model on the run's fixed training set and on the held-out
set (``dppo.run.evaluate.evaluate`` with the trainer's bf16 engine); on the first RL batch, μ's mean mass on the
padding ids (tokens no demonstration contains), the share of responses that sample one, and μ's mean top-K mass.

    python experiments/premise.py [--seeds 0,1,2] [--out FILE] [dppo train flags ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from first_batch import ROOT, first_batch, make_trainer  # noqa: E402

from dppo.run.evaluate import evaluate  # noqa: E402
from dppo.rundir.machine import machine_info, machine_line  # noqa: E402


class _Fixed:
    """The trainer's task with its fixed training set as the evaluation set."""

    def __init__(self, task, seed: int):
        self.task, self.seed = task, seed
        self.use_chat_template = task.use_chat_template

    def eval_examples(self):
        return self.task.fixed_problems(self.seed)

    def correct(self, ex, text):
        return self.task.correct(ex, text)


def main(argv: list[str]) -> int:
    seeds = [0, 1, 2]
    out_path = ROOT / "experiments" / "results" / "premise.json"
    if "--out" in argv:
        i = argv.index("--out")
        out_path = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if "--seeds" in argv:
        i = argv.index("--seeds")
        seeds = [int(s) for s in argv[i + 1].split(",")]
        argv = argv[:i] + argv[i + 2:]
    t0 = time.time()
    rows = []
    for seed in seeds:
        tr = make_trainer([*argv, "--seed", str(seed)], "pg-is")
        row = dict(seed=seed, model=tr.model_path)
        for name, task in (("fixed", _Fixed(tr.task, seed)), ("heldout", tr.task)):
            for temp in (0.0, 1.0):
                out = evaluate(tr.engine, tr.tok, task, max_new_tokens=tr.max_new_tokens, temperature=temp,
                               samples=1 if temp == 0 else 4, seed=seed, greedy=False)
                row[f"{name}_{'greedy' if temp == 0 else 'T1_avg4'}"] = out["eval/accuracy"]
        batch = first_batch(tr)
        ro = batch["ro"]
        real = 4 + len(tr.task.alphabet)  # <pad> <bos> <eos> <unk> + the alphabet; the rest is padding
        m = ro.response_mask
        lmu = ro.rollout_full_logp[m]
        row["tail_mass_mean"] = float(lmu[:, real:].exp().sum(-1).mean())
        row["tail_mass_p99"] = float(lmu[:, real:].exp().sum(-1).quantile(0.99))
        row["responses_with_tail_token"] = float(((ro.response_ids >= real) & m).any(-1).float().mean())
        row["top20_mass_mean"] = float(lmu.topk(20, -1).values.exp().sum(-1).mean())
        row["first_batch_reward"] = float(batch["rewards"].mean())
        row["response_len"] = float(m.sum(-1).float().mean())
        row["vocab"] = len(tr.tok)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = dict(rows=rows, wall_s=time.time() - t0, machine=machine_line(machine_info()),
               command="python experiments/premise.py " + " ".join(argv))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1))
    print(f"{res['wall_s']:.0f} s on {res['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
