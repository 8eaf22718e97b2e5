"""``dppo compare``: run several methods on one task with the same seeds and budget, then write a report directory.

    dppo compare --methods dppo-binary-tv grpo-clip-higher cispo@ratio_cap=3 --seeds 0,1,2 --out runs/cmp \\
        --jobs 2 -- --steps 40

Layout of ``OUT``::

    OUT/runs/<label>/seed<s>/metrics.jsonl   raw per-step metrics of each run (written by the runner)
    OUT/runs/<label>/seed<s>/run.log         the runner's stdout/stderr
    OUT/report.md                            table (final metrics, mean ± std over seeds) + plots + commands
    OUT/<metric>.png                         curves: mean over seeds, shaded min–max spread
    OUT/summary.json                         the table as data

* **Methods** are preset names (``dppo.PRESETS``), optionally with Method field overrides after ``@``:
  ``cispo@ratio_cap=3``, ``dppo-binary-tv@delta_low=0.2,delta_high=0.2``. The label is the whole spec, and the whole
  spec reaches the run (``dppo train --method SPEC``), which records the method it resolved in ``method.json``; the
  report prints it per label.
* **Runner**: ``python -m dppo train`` (default); ``--cmd`` takes any template with the fields
  ``{python} {method} {spec} {overrides} {seed} {run_dir}`` (``{method}`` is the preset name, ``{spec}`` the whole
  spec, ``{overrides}`` the overrides as JSON); a template that uses neither ``{spec}`` nor ``{overrides}`` is refused
  for a spec with overrides, naming it. Arguments after ``--`` go to every run unchanged.
* **Resumable**: a run whose directory holds ``done.json`` is skipped; an unfinished one is started again with the
  same directory (the runners resume from their checkpoint). ``--report-only`` just rebuilds the report.
* **Parallel**: ``--jobs N`` runs N processes at a time (each one thread unless the runner says otherwise).

The report itself (summary table, curves, resolved methods) is :mod:`dppo.report.summary`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dppo.report.summary import DEFAULT_METRICS, load_runs, write_report
from dppo.rundir.machine import machine_info, machine_line

__all__ = ["parse_method_spec", "main", "RUNNER"]

RUNNER = "{python} -m dppo train --method {spec} --seed {seed} --out {run_dir}"

def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"cispo@ratio_cap=3,delta_low=inf"`` → ("cispo", {"ratio_cap": 3, "delta_low": inf}), by
    :func:`dppo.methods.parse_spec`; unknown presets and bad fields fail here, before any run starts."""
    from dppo.methods import method_from_spec, parse_spec

    method_from_spec(spec)
    return parse_spec(spec)


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------------


def _run_one(cmd: list[str], run_dir: Path, env: dict) -> tuple[Path, int, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "run.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc == 0 and not (run_dir / "done.json").exists():  # runners that do not mark completion themselves
        (run_dir / "done.json").write_text(json.dumps(dict(wall_s=time.time() - t0)))
    return run_dir, rc, time.time() - t0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dppo compare", description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are passed to every run. Example: dppo compare --methods "
               "dppo-binary-tv,grpo-clip-higher --seeds 0,1,2 --out runs/cmp --jobs 2 -- --steps 40",
    )
    ap.add_argument("--methods", required=True, nargs="+",
                    help="preset names (space- or comma-separated), each optionally NAME@k=v,k=v")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated ints (default 0,1,2)")
    ap.add_argument("--out", required=True, type=Path, help="report directory")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    ap.add_argument("--cmd", default=None, help="command template instead of `python -m dppo train` (fields in the "
                    "module docstring)")
    ap.add_argument("--title", default="dppo compare")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="metrics to plot")
    ap.add_argument("--target", default=None, help="METRIC=VALUE: report steps until METRIC ≥ VALUE")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window for the curves")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run")
    ap.add_argument("--report-only", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    merged: list[str] = []
    for item in args.methods:  # "a,b" lists methods; "a@x=1,y=2" is one method with two overrides
        merged += [item] if "@" in item else [s.strip() for s in item.split(",") if s.strip()]
    methods = {s: parse_method_spec(s) for s in merged}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    target = None
    if args.target:
        k, _, v = args.target.partition("=")
        target = (k, float(v))
    template = args.cmd or RUNNER
    for label, (_, over) in methods.items():
        if over and "{spec}" not in template and "{overrides}" not in template:
            print(f"dppo compare: --cmd has neither {{spec}} nor {{overrides}}, so the overrides of {label!r} would "
                  "not reach the run; add one of them to the template", file=sys.stderr)
            return 2
    full_cmd = "python -m dppo compare " + shlex.join(list(argv) + (["--", *extra] if extra else []))
    t0 = time.time()
    if not args.report_only:
        jobs = []
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for label, (name, over) in methods.items():
            for seed in seeds:
                run_dir = args.out / "runs" / label / f"seed{seed}"
                if (run_dir / "done.json").exists():
                    continue
                fields = dict(python=shlex.quote(sys.executable), method=shlex.quote(name), spec=shlex.quote(label),
                              overrides=shlex.quote(json.dumps(over)), seed=seed, run_dir=shlex.quote(str(run_dir)))
                cmd = shlex.split(template.format(**fields)) + extra
                jobs.append((cmd, run_dir))
        print(f"dppo compare: {len(jobs)} run(s) to do, {args.jobs} at a time → {args.out}", flush=True)
        failed = []
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for run_dir, rc, dt in pool.map(lambda j: _run_one(j[0], j[1], env), jobs):
                print(f"  {'ok ' if rc == 0 else 'ERR'} {run_dir} ({dt:.0f} s)", flush=True)
                if rc != 0:
                    failed.append(str(run_dir))
        if failed:
            print(f"dppo compare: {len(failed)} run(s) failed; see run.log in: {', '.join(failed)}", file=sys.stderr)
    runs = load_runs(args.out)
    runs = {k: runs[k] for k in methods if k in runs}
    prev = args.out / "summary.json"
    wall, machine = time.time() - t0, machine_line(machine_info())
    if args.report_only and prev.exists():  # the figures are the earlier run's: keep its wall time and machine
        old = json.loads(prev.read_text())
        wall, machine = old.get("wall_s") or wall, old.get("machine") or machine
    write_report(args.out, runs, title=args.title, command=full_cmd, wall_s=wall, machine=machine,
                 metrics=[m for m in args.metrics.split(",") if m], target=target, smooth=args.smooth)
    print(f"dppo compare: report → {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
