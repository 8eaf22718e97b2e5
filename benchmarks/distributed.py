"""One process against torchrun with N processes on the same job: how far apart their metrics and final weights are,
and the time per step of each.

    python benchmarks/distributed.py                                  # the default job, 6 steps, 1 vs 2 processes
    python benchmarks/distributed.py --steps 10 --extra="--rollout_dtype fp32"
    python benchmarks/distributed.py --device cuda --nproc 8 --extra="--model /models/Qwen2.5-Math-1.5B ..."

Both runs are `dppo train` subprocesses with the same options (one torch thread per process unless --threads), the
torchrun one on CPU/gloo unless --device cuda. The per-step differences are taken from the two metrics.jsonl, the
weight difference from the two RUN/final models. A sampled response that differs (a reward or response length that is
not identical) marks where float summation order has flipped a draw; from there the runs are two samples of the same
process and their differences are statistical, not rounding. Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from dppo.rundir.machine import machine_info, machine_line
from dppo.rundir.metrics_log import read_metrics

SAMPLED = ("reward", "accuracy", "response_len", "tokens", "truncated_frac")
SUMS = ("loss/loss", "grad_norm", "grad_norm_max", "entropy")


def run(cmd: list[str], env: dict) -> float:
    t = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.time() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--extra", default="", help="more `dppo train` options for both runs")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed.json"))
    a = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="dppo-dist-")
    common = ["-m", "dppo", "train", "--steps", str(a.steps), "--eval_every", "0", "--ckpt_every", "0",
              "--threads", str(a.threads), "--device", a.device, "--no-progress", "--no-plot", "--no-tensorboard",
              *shlex.split(a.extra)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # warm-up cache first (not timed), so neither timed run trains it
    run([sys.executable, *common, "--out", os.path.join(tmp, "warm"), "--steps", "1"], env)
    wall1 = run([sys.executable, *common, "--out", os.path.join(tmp, "one")], env)
    walln = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
                 *common, "--out", os.path.join(tmp, "two")], env)
    one = [r for r in read_metrics(os.path.join(tmp, "one", "metrics.jsonl")) if "time/step" in r]
    two = [r for r in read_metrics(os.path.join(tmp, "two", "metrics.jsonl")) if "time/step" in r]
    steps = []
    for ra, rb in zip(one, two):
        same = all(ra[k] == rb[k] for k in SAMPLED if k in ra)
        steps.append({"step": ra["step"], "same_samples": same,
                      **{f"rel/{k}": abs(ra[k] - rb[k]) / max(abs(ra[k]), 1e-30) for k in SUMS},
                      **{f"abs/{k}": abs(ra[k] - rb[k]) for k in SUMS}})
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "one", "final"), local_files_only=True)
    mb = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "two", "final"), local_files_only=True)
    with torch.no_grad():
        dmax = max(float((x - y).abs().max()) for x, y in zip(ma.parameters(), mb.parameters()))
        rel = max(float((x - y).abs().max() / x.abs().max().clamp(min=1e-30))
                  for x, y in zip(ma.parameters(), mb.parameters()))

    def med(rows, k):
        return statistics.median(r[k] for r in rows[1:] or rows)  # the first step warms the kernels

    out = {"machine": machine_info(), "command": " ".join([sys.executable, *sys.argv]), "nproc": a.nproc,
           "steps": steps, "final_weights_max_abs_diff": dmax, "final_weights_max_rel_diff": rel,
           "wall_s": {"1": wall1, str(a.nproc): walln},
           "median_s": {n: {k: med(rows, k) for k in ("time/step", "time/rollout", "time/train")}
                        for n, rows in (("1", one), (str(a.nproc), two))}}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"machine: {machine_line(out['machine'])}\n")
    print("| step | same samples | loss rel diff | grad norm rel diff | entropy rel diff |\n|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {'yes' if s['same_samples'] else 'no'} | {s['rel/loss/loss']:.1e} | "
              f"{s['rel/grad_norm']:.1e} | {s['rel/entropy']:.1e} |")
    print(f"\nfinal weights: max |Δ| {dmax:.2e} (max relative to the tensor's largest entry {rel:.2e})\n")
    print("| processes | time/step (s) | rollout (s) | train (s) | wall (s) |\n|---|---|---|---|---|")
    for n, w in (("1", wall1), (str(a.nproc), walln)):
        m = out["median_s"][n]
        print(f"| {n} | {m['time/step']:.2f} | {m['time/rollout']:.2f} | {m['time/train']:.2f} | {w:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
