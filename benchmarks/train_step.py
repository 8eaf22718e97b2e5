"""Speed of the default training job, split by phase: steps/s, response tokens/s, and seconds per step spent in
rollout (sampling with the bf16 engine), recompute (the extra no-grad forward of anchor="recompute" methods) and
train (forward + backward + AdamW over the 4 mini-batches).

    python benchmarks/train_step.py                     # default job, dppo-binary-tv vs its recompute variant
    python benchmarks/train_step.py --threads 1 2 --steps 30 --methods dppo-binary-tv grpo
    python benchmarks/train_step.py --threads 1 --methods dppo-binary-tv \
        --extra= --extra="--lora_rank 8" --extra=--gradient_checkpointing   # a row per `dppo train` option string

Uses the default job's warmed-up model (trains and caches it first if needed, ~75 s), so response lengths are
those of the real run. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch

from dppo.run.cli import parse_config
from dppo.rundir.machine import machine_info, machine_line
from dppo.run.trainer import Trainer


def bench(method: str, threads: int, steps: int, warm: int, rollout_dtype: str, extra: str = "") -> dict:
    cfg = parse_config(["--out", "/tmp/dppo-bench", "--method", method, "--threads", str(threads), "--rollout_dtype",
                        rollout_dtype, "--steps", str(warm + steps), "--no-progress", "--no-tensorboard", "--no-plot",
                        *shlex.split(extra)])
    t = Trainer(cfg, log=lambda m: None)
    torch.set_num_threads(threads)
    recs = []
    for s in range(warm + steps):
        r = t.step(s)
        if s >= warm:
            recs.append(r)
    tot = sum(r["time/step"] for r in recs)

    def mean(k):
        return statistics.mean(r[k] for r in recs)

    return dict(method=method, options=extra, threads=threads, rollout=rollout_dtype, steps_per_s=len(recs) / tot,
                tokens_per_s=sum(r["tokens"] for r in recs) / tot, rollout_s=mean("time/rollout"),
                recompute_s=mean("time/recompute"), train_s=mean("time/train"), step_s=mean("time/step"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dppo-binary-tv", "dppo-binary-tv-recompute"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rollout_dtype", nargs="+", default=["bf16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=3, help="untimed steps first")
    p.add_argument("--extra", action="append", help="`dppo train` options for the run, one table row per --extra "
                   "(repeatable; write --extra=\"--lora_rank 8\" with '=', and --extra= for none; default: none)")
    a = p.parse_args(argv)
    rows = []
    for m in a.methods:
        for th in a.threads:
            for rd in a.rollout_dtype:
                for ex in a.extra or [""]:
                    rows.append(bench(m, th, a.steps, a.warm, rd, ex))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n{machine_line(machine_info())}\n{a.steps} timed steps after {a.warm} warm-up steps, "
          f"32 prompts × 8 responses, 4 mini-batches\n")
    print("| method | options | threads | rollout | steps/s | tokens/s | rollout s | recompute s | train s | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['options'] or '–'} | {r['threads']} | {r['rollout']} | {r['steps_per_s']:.2f} "
              f"| {r['tokens_per_s']:.0f} "
              f"| {r['rollout_s']:.3f} | {r['recompute_s']:.3f} | {r['train_s']:.3f} | {r['step_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
