"""The runs behind docs/results.md (evidence v3), as data: settings × methods × seeds, one `dppo train` each.

    python experiments/evidence.py list                       # the tables, their cells and run counts
    python experiments/evidence.py run TABLE [--seeds 0-7] [--jobs 2] [--dry]
    python experiments/evidence.py status [TABLE]             # which per-seed summaries exist

A *setting* is `dppo train --config experiments/positive_control.toml` plus a few flags (the mismatch source); a
*cell* is (setting, method); a *run* is (cell, seed). Every run writes its raw metrics under
``runs/evidence/<setting>/<method>/seed<k>/`` (not committed) and, when it finishes, a per-seed summary
``experiments/results/evidence/<setting>/<method>/seed<k>.json`` (committed as runs finish: a table can be built up
over several sessions; a run whose summary exists is skipped). The summary holds the command, the machine, the
wall time, the per-step series the report plots and the figures the protocol's tests use
(experiments/protocol.md): start (step-1 reward), final (mean reward over the last 20 % of steps), peak (largest
5-step moving average), Δ = final − start, collapsed (final < ½ peak), the held-out accuracies before and after.
The tables and verdicts are computed from these summaries alone by ``experiments/report_evidence.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "experiments/positive_control.toml"
LONG_CONFIG = "experiments/long.toml"  # the same miniature with ≥ 100-token responses (settings named long-*)
RESULTS = ROOT / "experiments" / "results" / "evidence"
RUNS = ROOT / "runs" / "evidence"

# setting → flags on top of CONFIG (which is the control: fp32 engine, on-policy)
SETTINGS: dict[str, list[str]] = {
    "control": [],  # fp32 rollout engine, lag 0: no mismatch (the positive control and the matched control)
    "bf16": ["--rollout_dtype", "bf16"],
    "fp8": ["--rollout_dtype", "fp8"],
    **{f"bf16-lag{k}": ["--rollout_dtype", "bf16", "--rollout_lag", str(k)] for k in (1, 2, 4, 8)},
    **{f"fp32-lag{k}": ["--rollout_lag", str(k)] for k in (1, 2, 4, 8)},
    **{f"fp8-lag{k}": ["--rollout_dtype", "fp8", "--rollout_lag", str(k)] for k in (4,)},
    # what kept the previous miniature (experiments/miniature.toml) from learning: one of its choices at a time
    "pc-8x8": ["--prompts_per_step", "8"], "pc-lr3e-5": ["--lr", "3e-5"], "pc-exact": ["--warmup_noise", "0"],
    # responses of ≥ 100 tokens (12-digit addition written out): does the mismatch compound with length?
    "long-control": [], "long-bf16": ["--rollout_dtype", "bf16"], "long-fp8": ["--rollout_dtype", "fp8"],
}

SEC51 = ["pg-is", "cispo", "grpo-clip-higher", "minirl", "dppo-binary-tv", "dppo-binary-kl", "dppo-topk-tv", "ipo",
         "icepop", "vaco"]
CONTROL4 = ["pg-is", "cispo", "grpo-clip-higher", "dppo-binary-tv"]
STALE = ["pg-is", "grpo-clip-higher", "ipo", "dppo-binary-tv", "dppo-binary-kl"]

# The pilot (seeds 100, 101: never used by a table) chose the mismatch setting of the main tables; protocol.md.
MAIN = os.environ.get("EVIDENCE_MAIN", "fp8-lag4")  # chosen by the pilot's rule: protocol.md §3, §7

TABLES: dict[str, list[tuple[str, str]]] = {
    "pilot": [(s, m) for s in ("control", "bf16", "fp8", "bf16-lag2", "bf16-lag4", "bf16-lag8", "fp8-lag4")
              for m in ("pg-is", "dppo-binary-tv")],
    "positive_control": [("control", m) for m in ("dppo-binary-tv", "grpo-clip-higher")],
    "sec51": [(MAIN, m) for m in SEC51] + [("control", m) for m in CONTROL4],
    # claim 5 (anchor: μ vs the recomputed π_θ′) and claim 6 (the minimal negative mask, δ 0.5, and anchored to π_θ′)
    "ablations": [(MAIN, m) for m in ("dppo-binary-kl-recompute", "minimal-negative-mask",
                                      "minimal-negative-mask@anchor=recompute")],
    "staleness": [(s, m) for s in ("bf16", "bf16-lag1", "bf16-lag2", "bf16-lag4") for m in STALE],
    # descriptive (no decision rule): the previous miniature's choices one at a time in the control, seeds 0-3
    "why": [(s, "dppo-binary-tv") for s in ("pc-8x8", "pc-lr3e-5", "pc-exact")],
    # descriptive (no decision rule): the mismatch over training with long responses, seeds 0-2
    "long": [(s, m) for s in ("long-control", "long-bf16", "long-fp8") for m in ("pg-is", "dppo-binary-tv")],
}

SERIES = ("reward", "accuracy", "mismatch/abs_diff_mean", "mismatch/abs_diff_max", "mismatch/abs_dlogp_mean",
          "loss/abs_diff_mean", "loss/masked_frac", "loss/ratio_max", "grad_norm", "entropy", "rollout/lag",
          "response_len")
EVAL = ("eval/accuracy", "eval/greedy_accuracy")


def parse_seeds(s: str) -> list[int]:
    out: list[int] = []
    for part in s.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def summary_path(setting: str, method: str, seed: int) -> Path:
    return RESULTS / setting / method / f"seed{seed}.json"


def command(setting: str, method: str, seed: int) -> list[str]:
    out = RUNS / setting / method / f"seed{seed}"
    config = LONG_CONFIG if setting.startswith("long-") else CONFIG
    return [sys.executable, "-m", "dppo", "train", "--config", config, *SETTINGS[setting], "--method", method,
            "--seed", str(seed), "--out", str(out.relative_to(ROOT)), "--no-progress", "--no-tensorboard",
            "--no-plot"]


def summarize(setting: str, method: str, seed: int, cmd: list[str], wall: float) -> dict:
    """The per-seed summary of a finished run (module docstring)."""
    from dppo.rundir.machine import machine_line
    from dppo.rundir.metrics_log import read_metrics

    run = RUNS / setting / method / f"seed{seed}"
    recs = read_metrics(str(run / "metrics.jsonl"))
    starts = [json.loads(x) for x in (run / "machine.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if r.get("step", 0) >= 1 and "reward" in r]
    series = {k: [float(r[k]) if isinstance(r.get(k), (int, float)) else None for r in steps] for k in SERIES}
    rw = series["reward"]
    tail = max(1, len(rw) // 5)
    final = sum(rw[-tail:]) / tail
    ma = [sum(rw[i:i + 5]) / 5 for i in range(max(1, len(rw) - 4))]
    peak = max(ma)
    evals = [r for r in recs if "eval/accuracy" in r]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return dict(
        setting=setting, method=method, seed=seed, command=shlex.join(["python", *cmd[1:]]), wall_s=round(wall, 1),
        date=time.strftime("%Y-%m-%d"), commit=commit, machine="; then ".join(dict.fromkeys(machine_line(m) for m in starts)),
        steps=len(rw),
        start=rw[0], final=final, peak=peak, delta=final - rw[0], collapsed=bool(final < 0.5 * peak),
        eval_start={k: evals[0].get(k) for k in EVAL} if evals else {},
        eval_end={k: evals[-1].get(k) for k in EVAL} if evals else {},
        mismatch_mean=_mean(series["mismatch/abs_diff_mean"]), mismatch_max=_max(series["mismatch/abs_diff_mean"]),
        masked_frac_mean=_mean(series["loss/masked_frac"]), ratio_max=_max(series["loss/ratio_max"]),
        grad_norm_max=_max(series["grad_norm"]), series=series)


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _max(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return max(xs) if xs else None


def run_one(setting: str, method: str, seed: int) -> str:
    path = summary_path(setting, method, seed)
    if path.exists():
        return f"skip  {setting}/{method}/seed{seed} (summary exists)"
    cmd = command(setting, method, seed)
    out = RUNS / setting / method / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "run.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if rc != 0:
        return f"FAIL  {setting}/{method}/seed{seed} (exit {rc}; {out / 'run.log'})"
    summ = summarize(setting, method, seed, cmd, wall)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summ, indent=1) + "\n")
    return (f"done  {setting}/{method}/seed{seed}: start {summ['start']:.3f} final {summ['final']:.3f} "
            f"mismatch {summ['mismatch_mean']:.4f} ({wall:.0f} s)")


def warm_up(seeds: list[int], jobs: int, config: str = CONFIG) -> None:
    """Each seed's warm-up model (cached), before the runs that share it start in parallel."""
    def one(seed):
        cmd = [sys.executable, "-c", "import sys; from dppo.run.cli import parse_config; "
               "from dppo.run.warmup import warm_start_for; warm_start_for(parse_config(sys.argv[1:]), log=print)",
               "--config", config, "--seed", str(seed), "--out", "/tmp/unused"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return seed

    with ThreadPoolExecutor(jobs) as ex:
        for seed in ex.map(one, seeds):
            print(f"warm-up of seed {seed} ready", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="experiments/evidence.py")
    ap.add_argument("what", choices=["list", "run", "status"])
    ap.add_argument("table", nargs="?")
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dry", action="store_true")
    ns = ap.parse_args(argv)
    seeds = parse_seeds(ns.seeds)
    tables = [ns.table] if ns.table else list(TABLES)
    if ns.what == "list" or ns.what == "status":
        for t in tables:
            cells = TABLES[t]
            have = sum(summary_path(s, m, sd).exists() for s, m in cells for sd in seeds)
            print(f"{t}: {len(cells)} cells × {len(seeds)} seeds = {len(cells) * len(seeds)} runs, {have} done")
            if ns.what == "status":
                for s, m in cells:
                    done = [sd for sd in seeds if summary_path(s, m, sd).exists()]
                    print(f"  {s:12s} {m:32s} {len(done)}/{len(seeds)}")
        return 0
    if ns.table is None:
        ap.error("run needs a TABLE")
    runs = [(s, m, sd) for sd in seeds for s, m in TABLES[ns.table]]  # seed-major: all cells of a seed together
    if ns.dry:
        for s, m, sd in runs:
            print(shlex.join(command(s, m, sd)))
        return 0
    for config in sorted({LONG_CONFIG if s.startswith("long-") else CONFIG for s, _ in TABLES[ns.table]}):
        warm_up(seeds, ns.jobs, config)
    t0 = time.time()
    with ThreadPoolExecutor(ns.jobs) as ex:
        for line in ex.map(lambda r: run_one(*r), runs):
            print(line, flush=True)
    print(f"{ns.table}: {len(runs)} runs in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
