"""Soak: the default job for thousands of steps, with the process's memory sampled at every step.

Memory that creeps (caches, metric lists, autograd graphs kept alive) only shows after hours; this runs the shipped
`dppo train` loop (metrics.jsonl, TensorBoard, checkpoints and evaluation included) in-process and records, after
every step's metrics record is written: the resident set size (RSS, /proc/self/statm), the number of live Python
objects (every 100 steps) and the step time. The figure of merit is the RSS growth from step 100 (after warm-up
allocations and the first evaluations) to the end (goal: under 5 %), and the step-time drift (mean of the last 10 %
of steps over the mean of steps 100–200).

    .venv/bin/python benchmarks/soak.py --steps 2000 --out runs/soak     # ~1 h on 2 cores
    .venv/bin/python benchmarks/soak.py --steps 300 --out runs/soak-short

Writes ``OUT/soak.json`` (per-step samples and the summary) and prints the summary. Each sample is also appended to
``OUT/soak_samples.jsonl`` as it is taken, so a soak that is killed keeps its figure:

    .venv/bin/python benchmarks/soak.py --summarize runs/soak      # the summary of what a killed soak recorded
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--from_step", type=int, default=100, help="growth is measured from this step to the end")
    ap.add_argument("--summarize", metavar="OUT", help="only summarise OUT/soak_samples.jsonl (a killed soak)")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(os.path.join(args.summarize, "soak_samples.jsonl")) as f:
            samples = [json.loads(line) for line in f if line.strip()]
        summary = summarize(samples, args.from_step, None, "killed soak: summarised from soak_samples.jsonl")
        print(json.dumps({k: v for k, v in summary.items() if k != "py_objects"}, indent=1))
        return 0

    import dppo.run.loop as loop
    from dppo.run.config import make_config

    samples: list[dict] = []
    real_write = loop.MetricsLog.write
    last = {"t": time.perf_counter()}

    def write(self, record):
        real_write(self, record)
        now = time.perf_counter()
        s = {"step": record["step"], "rss_mb": rss_mb(), "wall_s": now - last["t"],
             "step_s": record.get("time/step")}
        if record["step"] % 100 == 0:
            s["py_objects"] = len(gc.get_objects())
        samples.append(s)
        sink.write(json.dumps(s) + "\n")
        sink.flush()
        last["t"] = now

    loop.MetricsLog.write = write
    cfg = make_config(out=args.out, steps=args.steps, progress=False, plot=False)
    t0 = time.perf_counter()
    if os.path.isdir(args.out):
        import shutil

        shutil.rmtree(args.out)
    os.makedirs(args.out)
    sink = open(os.path.join(args.out, "soak_samples.jsonl"), "w")
    loop.train(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    sink.close()
    summary = summarize(samples, args.from_step, wall,
                        "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    summary["steps"] = args.steps
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump({"summary": summary, "samples": samples}, f)
    print(json.dumps({k: v for k, v in summary.items() if k != "py_objects"}, indent=1))
    print("python objects (step, count):", summary["py_objects"][:3], "…", summary["py_objects"][-3:])
    return 0


def summarize(samples: list[dict], from_step: int, wall: float | None, command: str) -> dict:
    """RSS growth from ``from_step`` to the last sample, and the step-time drift (last 10 % over steps
    from_step … 2·from_step)."""
    from dppo.rundir.machine import machine_info, machine_line

    steps = [s for s in samples if s["step"] >= 1]
    base = next(s for s in steps if s["step"] >= from_step)
    end = steps[-1]
    peak = max(s["rss_mb"] for s in steps if s["step"] >= from_step)
    times = [s["step_s"] for s in steps if s["step_s"] is not None]
    early = [s["step_s"] for s in steps if from_step <= s["step"] < 2 * from_step and s["step_s"]]
    late = times[-max(1, len(times) // 10):]
    objs = [(s["step"], s["py_objects"]) for s in samples if "py_objects" in s]
    return {
        "command": command, "machine": machine_line(machine_info()),
        "steps_recorded": end["step"], "wall_min": None if wall is None else wall / 60,
        "rss_mb_at_from_step": base["rss_mb"], "rss_mb_end": end["rss_mb"], "rss_mb_peak_after_from_step": peak,
        "rss_growth_pct": 100 * (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"],
        "step_s_early_mean": sum(early) / len(early), "step_s_last10pct_mean": sum(late) / len(late),
        "step_time_drift": (sum(late) / len(late)) / (sum(early) / len(early)),
        "py_objects": objs,
    }


if __name__ == "__main__":
    sys.exit(main())
