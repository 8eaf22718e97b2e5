"""Paired comparison of a `dppo compare` report directory: every seed starts all methods from the same warm-up
model, so a method's effect is measured against its own seed's start and against a reference method on that seed
(the spread between seeds is mostly the spread between warm-up models).

Per method, mean ± std over seeds of:
    start          reward of step 1 (the warm-up model's rollout: the same for every method on a seed)
    Δ reward       final reward (mean of the last 20 % of steps) − start
    vs REF         final reward − REF's final reward on the same seed
    greedy start → end   held-out greedy accuracy at the first and the last evaluation
    max mismatch   the largest pre-update mean |π−μ| of the run (mismatch/abs_diff_mean)

    python experiments/paired.py runs/results/sanity [--ref pg-is]      # prints markdown, writes paired.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from dppo.report.summary import load_runs


def _series(recs: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _ms(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)


def paired(root: Path, ref: str) -> dict:
    runs = load_runs(root)
    per: dict[str, dict[int, dict]] = {}
    for label, seeds in runs.items():
        for seed, recs in seeds.items():
            rw = _series(recs, "reward")
            if not rw:
                continue
            g = _series(recs, "eval/greedy_accuracy")
            per.setdefault(label, {})[seed] = dict(
                start=rw[0], final=sum(rw[-max(1, len(rw) // 5):]) / max(1, len(rw) // 5),
                greedy_start=g[0] if g else math.nan, greedy_end=g[-1] if g else math.nan,
                max_mismatch=max(_series(recs, "mismatch/abs_diff_mean") or [math.nan]), steps=len(rw))
    out = {}
    for label, seeds in per.items():
        row = {k: _ms([s[k] for s in seeds.values()]) for k in ("start", "final", "greedy_start", "greedy_end",
                                                                 "max_mismatch")}
        row["delta"] = _ms([s["final"] - s["start"] for s in seeds.values()])
        common = [sd for sd in seeds if sd in per.get(ref, {})]
        row["vs_ref"] = _ms([seeds[sd]["final"] - per[ref][sd]["final"] for sd in common]) if common else None
        row["seeds"] = sorted(seeds)
        row["per_seed_final"] = {sd: seeds[sd]["final"] for sd in sorted(seeds)}
        out[label] = row
    return out


def table(rows: dict, ref: str) -> str:
    f = lambda ms, d=3: "–" if ms is None or math.isnan(ms[0]) else f"{ms[0]:+.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    g = lambda ms, d=3: "–" if ms is None or math.isnan(ms[0]) else f"{ms[0]:.{d}f}"  # noqa: E731
    lines = [f"| method | seeds | start | Δ reward | vs {ref} | final reward per seed | greedy start → end | max mismatch |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        per_seed = " / ".join(f"{v:.2f}" for v in r["per_seed_final"].values())
        lines.append(f"| `{label}` | {len(r['seeds'])} | {g(r['start'])} | {f(r['delta'])} | {f(r['vs_ref'])} | "
                     f"{per_seed} | {g(r['greedy_start'], 2)} → {g(r['greedy_end'], 2)} | "
                     f"{g(r['max_mismatch'], 4)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--ref", default="pg-is")
    a = ap.parse_args(argv)
    rows = paired(a.root, a.ref)
    (a.root / "paired.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, a.ref))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
