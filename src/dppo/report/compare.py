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

The report helpers (:func:`load_runs`, :func:`plot_curves`, :func:`summarise`, :func:`write_report`) are plain
functions over ``{label: {seed: [metric dicts]}}`` so the experiment scripts reuse them.
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

from dppo.metrics import describe
from dppo.run.machine import machine_info, machine_line

__all__ = [
    "parse_method_spec", "load_runs", "summarise", "plot_curves", "write_report", "steps_to_target", "main",
    "RUNNER",
]

RUNNER = "{python} -m dppo train --method {spec} --seed {seed} --out {run_dir}"

DEFAULT_METRICS = ("reward", "mismatch/abs_diff_mean", "loss/abs_diff_mean", "loss/masked_frac", "entropy",
                   "eval/accuracy")

# Summary column → the one metric it reads (meanings: dppo.metrics).
SUMMARY_KEYS = {
    "mismatch": "mismatch/abs_diff_mean",
    "drift": "loss/abs_diff_mean",
    "masked_frac": "loss/masked_frac",
    "heldout_acc": "eval/accuracy",
}


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"cispo@ratio_cap=3,delta_low=inf"`` → ("cispo", {"ratio_cap": 3.0, "delta_low": inf})."""
    name, _, rest = spec.partition("@")
    over: dict = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if not _:
            raise ValueError(f"bad override {kv!r} in {spec!r}: expected key=value")
        try:
            val: object = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            val = v
        over[k.strip()] = val
    from dppo.methods import method_from_spec

    method_from_spec(spec)  # unknown presets and bad fields fail here, before any run starts
    return name, over


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: ignore it
                    pass
    return out


def load_runs(root: Path) -> dict[str, dict[int, list[dict]]]:
    """``{label: {seed: [records]}}`` from ``root/runs/<label>/seed<s>/metrics.jsonl``."""
    runs: dict[str, dict[int, list[dict]]] = {}
    base = Path(root) / "runs"
    if not base.exists():
        return runs
    for mdir in sorted(base.iterdir()):
        for sdir in sorted(mdir.glob("seed*")):
            recs = _read_jsonl(sdir / "metrics.jsonl")
            if recs:
                runs.setdefault(mdir.name, {})[int(sdir.name[4:])] = recs
    return runs


def _series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(recs):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r.get("step", i)))
            ys.append(float(v))
    return xs, ys


def _mean_std(vals: list[float]) -> tuple[float, float]:
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _title(key: str) -> str:
    return f"{key}: {describe(key)}" if describe(key) != key else key


def _resolved_methods(root: Path) -> dict[str, str]:
    """``{label: "field=value, …"}`` from the first seed's ``method.json`` of every label."""
    out = {}
    base = Path(root) / "runs"
    for mdir in sorted(base.iterdir()) if base.exists() else []:
        for path in sorted(mdir.glob("seed*/method.json"))[:1]:
            m = json.loads(path.read_text())
            out[mdir.name] = ", ".join(f"{k}={v}" for k, v in m.items())
    return out


def steps_to_target(recs: list[dict], key: str, target: float) -> int | None:
    """First step at which ``key`` ≥ ``target`` (None if never)."""
    for x, y in zip(*_series(recs, key)):
        if y >= target:
            return x
    return None


def summarise(runs: dict[str, dict[int, list[dict]]], *, last_frac: float = 0.2, target: tuple[str, float] | None = None,
              collapse_drop: float = 0.5) -> dict[str, dict]:
    """Per method, mean ± std over seeds of: final reward (mean of the last ``last_frac`` of steps), peak reward,
    final and peak mismatch, mean masked fraction, final held-out accuracy, steps to ``target`` and the number of
    seeds that *collapsed* (final reward < ``collapse_drop`` × the run's peak reward, after the peak ≥ 0.2)."""
    out = {}
    for label, seeds in runs.items():
        acc: dict[str, list[float]] = {}
        collapsed, reached, steps = 0, 0, []
        for recs in seeds.values():
            def tail(ys: list[float]) -> list[float]:
                return ys[-max(1, int(len(ys) * last_frac)):]

            def mean(ys: list[float]) -> float | None:
                return sum(ys) / len(ys) if ys else None

            def add(k: str, v: float | None) -> None:
                if v is not None and math.isfinite(v):
                    acc.setdefault(k, []).append(v)

            rw = _series(recs, "reward")[1]
            fin = mean(tail(rw))
            add("final_reward", fin)
            add("peak_reward", max(rw) if rw else None)
            if rw and max(rw) >= 0.2 and fin is not None and fin < collapse_drop * max(rw):
                collapsed += 1
            mm = _series(recs, SUMMARY_KEYS["mismatch"])[1]
            add("final_mismatch", mean(tail(mm)))
            add("peak_mismatch", max(mm) if mm else None)
            add("final_drift", mean(tail(_series(recs, SUMMARY_KEYS["drift"])[1])))
            add("final_entropy", mean(tail(_series(recs, "entropy")[1])))
            add("masked_frac", mean(_series(recs, SUMMARY_KEYS["masked_frac"])[1]))
            ho = _series(recs, SUMMARY_KEYS["heldout_acc"])[1]
            add("final_heldout_acc", ho[-1] if ho else None)
            add("steps", float(len(recs)))
            if target:
                s = steps_to_target(recs, *target)
                if s is not None:
                    reached += 1
                    steps.append(s)
        row = {k: _mean_std(v) for k, v in acc.items()}
        row["seeds"] = len(seeds)
        row["collapsed_seeds"] = collapsed
        if target:
            row["target"] = dict(metric=target[0], value=target[1], reached=reached, steps=steps,
                                 mean_steps=_mean_std([float(s) for s in steps])[0] if steps else None)
        out[label] = row
    return out


def plot_curves(runs: dict[str, dict[int, list[dict]]], metrics=DEFAULT_METRICS, path: Path | None = None,
                title: str = "", smooth: int = 1, ncols: int = 2):
    """One panel per metric: per method the mean over seeds (line) and the min–max spread (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(_series(r, m)[1] for s in runs.values() for r in s.values())]
    if not metrics:
        return None
    ncols = min(ncols, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        for i, (label, seeds) in enumerate(runs.items()):
            per_step: dict[int, list[float]] = {}
            for recs in seeds.values():
                xs, ys = _series(recs, key)
                if smooth > 1 and len(ys) >= smooth:
                    ys = [sum(ys[max(0, j - smooth + 1): j + 1]) / len(ys[max(0, j - smooth + 1): j + 1])
                          for j in range(len(ys))]
                for x, y in zip(xs, ys):
                    per_step.setdefault(x, []).append(y)
            if not per_step:
                continue
            xs = sorted(per_step)
            mean = [sum(per_step[x]) / len(per_step[x]) for x in xs]
            lo = [min(per_step[x]) for x in xs]
            hi = [max(per_step[x]) for x in xs]
            color = f"C{i % 10}"
            ls = "-" if i < 10 else "--"
            ax.plot(xs, mean, color=color, ls=ls, lw=1.4, label=f"{label} (n={len(seeds)})")
            ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
        ax.set_title(_title(key), fontsize=10)
        ax.set_xlabel("step (rollout batch)")
        if key.endswith("abs_diff_mean"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 4), 1, 0.97 if title else 1))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    if ms is None or not isinstance(ms, tuple) or ms[0] is None or not math.isfinite(ms[0]):
        return "–"
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summary_table(summary: dict[str, dict]) -> str:
    """Markdown table of :func:`summarise`'s output."""
    has_target = any("target" in r for r in summary.values())
    head = ["method", "seeds", "final reward", "peak reward", "collapsed", "final pre-update abs(π−μ)",
            "peak pre-update abs(π−μ)", "final abs(π−μ) over updates", "masked frac", "final entropy",
            "final held-out acc"]
    if has_target:
        head.append("steps to target (reached)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in summary.items():
        cells = [f"`{label}`", str(r["seeds"]), _fmt(r.get("final_reward")), _fmt(r.get("peak_reward")),
                 f"{r['collapsed_seeds']}/{r['seeds']}", _fmt(r.get("final_mismatch"), 4),
                 _fmt(r.get("peak_mismatch"), 4), _fmt(r.get("final_drift"), 4), _fmt(r.get("masked_frac"), 4),
                 _fmt(r.get("final_entropy")),
                 _fmt(r.get("final_heldout_acc"))]
        if has_target:
            t = r.get("target") or {}
            ms = t.get("mean_steps")
            cells.append(f"{ms:.0f} ({t.get('reached', 0)}/{r['seeds']})" if ms is not None else
                         f"never (0/{r['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, runs: dict[str, dict[int, list[dict]]], *, title: str, command: str = "",
                 wall_s: float | None = None, metrics=DEFAULT_METRICS, target: tuple[str, float] | None = None,
                 notes: str = "", smooth: int = 1, machine: str = "") -> dict:
    """``out/report.md`` + ``out/curves.png`` + ``out/summary.json``; returns the summary. ``machine``: where the
    runs ran (:func:`dppo.run.machine.machine_line`); figures from different CPUs differ for the same seed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, target=target)
    png = plot_curves(runs, metrics, out / "curves.png", title=title, smooth=smooth)
    md = [f"# {title}", ""]
    if command:
        md += ["Command:", "", "```bash", command, "```", ""]
    if wall_s is not None:
        md += [f"Wall time: {wall_s / 60:.1f} min.", ""]
    if machine:
        md += [f"Machine: {machine}.", ""]
    if png:
        md += ["![curves](curves.png)", ""]
    md += [summary_table(summary), "",
           "Final = mean over the last 20 % of steps; ± is the standard deviation over seeds. *Collapsed*: final "
           "reward below half the run's peak (peak ≥ 0.2). Raw per-step metrics: `runs/<method>/seed<s>/metrics.jsonl`.",
           "Columns: " + "; ".join(f"{k} = `{v}` ({describe(v)})" for k, v in SUMMARY_KEYS.items()) + ".",
           ""]
    methods = _resolved_methods(out)
    if methods:
        md += ["Resolved methods (each run's `method.json`):", ""]
        md += [f"- `{label}`: {m}" for label, m in methods.items()] + [""]
    if notes:
        md += [notes, ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps(dict(summary=summary, command=command, wall_s=wall_s,
                                                      machine=machine), indent=1, default=str))
    return summary


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
