"""Seconds per step of `dppo train`, sampling then training (sync) vs sampling the next batch while training
(``--async_rollout 1``), in one run on this machine, alternating the variants; and how each side's time splits
between working and waiting.

Variants (the same job otherwise; `dppo train` as shipped):
    sync        --threads T                                   today's default: rollout, then train, on T threads
    sync-lag1   --threads T --rollout_lag 1                   what --async_rollout 1 computes, synchronously
    async       --threads T/2 --rollout_threads T/2 --async_rollout 1   the worker samples step t+1 while the trainer
                                                              trains step t; trainer and worker split the cores
Jobs: ``default`` (the README's default job) and ``long`` (the 5 M-parameter job of benchmarks/peer_trl_e2e.py:
hidden 256, 4 layers, 4,096-id vocabulary, addition-steps at 4 digits, 16 prompts × 8).

Per run: s/step = the median of ``time/step`` over the steps after the first 3 (start-up excluded); the trainer's
wait = ``time/rollout`` (async: waiting for the worker's batch), its work = ``time/train``; the worker's work =
``time/rollout_worker`` and its idle time = the step time − that. Learning: the held-out accuracy before and after
(sync-lag1 and async must be equal: the same computation). Ratios are taken within one invocation.

    .venv/bin/python benchmarks/async_rollout.py [--jobs default,long] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dppo.rundir.machine import machine_info, machine_line  # noqa: E402
from dppo.rundir.metrics_log import read_metrics  # noqa: E402

JOBS = {
    "default": dict(steps=40, args=[]),
    "long": dict(steps=16, args=["--task", "addition-steps", "--task_digits", "4", "--vocab_pad", "4096", "--hidden",
                                 "256", "--layers", "4", "--heads", "4", "--warmup_steps", "800", "--warmup_noise",
                                 "0.0", "--warmup_seed", "0", "--eval_per_level", "20", "--prompts_per_step", "16",
                                 "--lr", "2e-5"]),
}


def variants(threads: int) -> dict[str, list[str]]:
    half = max(1, threads // 2)
    return {"sync": ["--threads", str(threads)],
            "sync-lag1": ["--threads", str(threads), "--rollout_lag", "1"],
            "async": ["--threads", str(half), "--rollout_threads", str(threads - half or 1), "--async_rollout", "1"]}


def run(job: str, variant: str, args: list[str], out: Path) -> dict:
    j = JOBS[job]
    cmd = [sys.executable, "-m", "dppo", "train", "--out", str(out), "--steps", str(j["steps"]), "--eval_every", "0",
           "--ckpt_every", "0", "--no-progress", "--no-tensorboard", "--no-plot", *j["args"], *args]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.time() - t0
    recs = read_metrics(str(out / "metrics.jsonl"))
    steps = [r for r in recs if "time/step" in r][3:]
    evals = [r for r in recs if "eval/accuracy" in r]
    med = lambda k: statistics.median(r[k] for r in steps) if steps and k in steps[0] else None  # noqa: E731
    row = dict(job=job, variant=variant, wall_s=wall, s_per_step=med("time/step"),
               trainer_wait=med("time/rollout"), trainer_work=med("time/train"),
               worker_work=med("time/rollout_worker"),
               heldout_start=evals[0]["eval/accuracy"], heldout_end=evals[-1]["eval/accuracy"],
               reward_first5=statistics.mean(r["reward"] for r in recs if "reward" in r and r["step"] <= 5),
               reward_last5=statistics.mean(r["reward"] for r in recs[-5:] if "reward" in r),
               command=" ".join(["dppo train", *cmd[4:]]))
    if row["worker_work"] is not None:
        row["worker_idle"] = row["s_per_step"] - row["worker_work"]
    return row


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="default,long")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async_rollout.json"))
    ns = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in ns.jobs.split(","):
            # the warm-up model once (cached), before anything is timed
            run(job, "sync", ["--threads", str(ns.threads), "--steps", "1"], Path(tmp) / f"{job}-warm")
            for rep in range(ns.repeats):
                for name, args in variants(ns.threads).items():
                    r = run(job, name, args, Path(tmp) / f"{job}-{name}-{rep}")
                    r["repeat"] = rep
                    rows.append(r)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                      if k != "command"}), flush=True)
    summary = {}
    for job in ns.jobs.split(","):
        med = {v: statistics.median(r["s_per_step"] for r in rows if r["job"] == job and r["variant"] == v)
               for v in variants(ns.threads)}
        summary[job] = dict(s_per_step=med, async_over_sync=med["async"] / med["sync"],
                            async_over_sync_lag1=med["async"] / med["sync-lag1"])
        print(f"{job}: sync {med['sync']:.3f} s/step, sync-lag1 {med['sync-lag1']:.3f}, async {med['async']:.3f} "
              f"→ async/sync {summary[job]['async_over_sync']:.2f}×", flush=True)
    res = dict(rows=rows, summary=summary, machine=machine_line(machine_info()), date=time.strftime("%Y-%m-%d"),
               command="python benchmarks/async_rollout.py " + " ".join(argv))
    Path(ns.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
