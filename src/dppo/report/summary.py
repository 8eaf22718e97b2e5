"""Reports over run directories written by ``dppo train``: ``{label: {seed: [metric records]}}`` → a summary table
(final and peak figures, mean ± std over seeds), curves, and a report directory. :mod:`dppo.report.compare` runs the
experiments and calls these; the experiment scripts reuse them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dppo.metrics import describe

__all__ = ["load_runs", "summarise", "plot_curves", "write_report", "summary_table", "steps_to_target",
           "DEFAULT_METRICS", "SUMMARY_KEYS"]

DEFAULT_METRICS = ("reward", "mismatch/abs_diff_mean", "loss/abs_diff_mean", "loss/masked_frac", "entropy",
                   "eval/accuracy")

# Summary column → the one metric it reads (meanings: dppo.metrics).
SUMMARY_KEYS = {
    "mismatch": "mismatch/abs_diff_mean",
    "drift": "loss/abs_diff_mean",
    "masked_frac": "loss/masked_frac",
    "heldout_acc": "eval/accuracy",
}


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
    runs ran (:func:`dppo.rundir.machine.machine_line`); figures from different CPUs differ for the same seed."""
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
