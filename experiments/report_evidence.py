"""Tables, verdicts and figures of docs/results.md (evidence v3) from the committed per-seed summaries alone.

    python experiments/report_evidence.py [--seeds 0-7]

reads ``experiments/results/evidence/<setting>/<method>/seed<k>.json`` (written by ``experiments/evidence.py``),
applies the tests and decision rules of ``experiments/protocol.md`` (paired by seed, 95 % Student-t intervals,
``experiments/stats.py``) and writes ``experiments/results/evidence/report.md`` + ``report.json`` and the figures
``docs/img/evidence_*.png``. A cell with fewer seeds than asked is reported with the seeds it has, and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence import CONTROL4, MAIN, RESULTS, ROOT, SEC51, STALE, parse_seeds  # noqa: E402
from stats import detectable, mean_sd, t_interval, tost  # noqa: E402

IMG = ROOT / "docs" / "img"
LAGS = {"bf16": 0, "bf16-lag1": 1, "bf16-lag2": 2, "bf16-lag4": 4}


def load(seeds: list[int]) -> dict:
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for path in RESULTS.glob("*/*/seed*.json"):
        seed = int(path.stem[4:])
        if seed in seeds:
            s = json.loads(path.read_text())
            out.setdefault((s["setting"], s["method"]), {})[seed] = s
    return out


def values(runs, setting, method, key="final") -> dict[int, float]:
    cell = runs.get((setting, method), {})
    return {sd: _get(s, key) for sd, s in cell.items() if _get(s, key) is not None}


def _get(s: dict, key: str):
    if "." in key:
        a, b = key.split(".", 1)
        return (s.get(a) or {}).get(b)
    return s.get(key)


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [a[s] - b[s] for s in common]
    ci = t_interval(d)
    ci["seeds"] = common
    ci["detectable"] = detectable(ci["sd"], len(d))
    return ci


def fmt_ci(ci: dict | None, digits: int = 3) -> str:
    if ci is None:
        return "n/a"
    f = f"{{:+.{digits}f}}"
    return f"{f.format(ci['mean'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]" + (
        f" (n={ci['n']})" if ci["n"] != 8 else "")


def fmt_ms(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "n/a"
    m, sd = mean_sd(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def verdict(ci: dict | None, want: int) -> str:
    """``want`` = +1: the claim needs the interval above 0; −1: below 0."""
    if ci is None:
        return "not run"
    if ci["excludes_0"] == want:
        return "reproduces"
    if ci["excludes_0"] == -want:
        return "contradicted"
    return f"not shown (could detect ≥ {ci['detectable']:.3f})"


# ---------------------------------------------------------------------------------------------------------------------
def claims(runs) -> list[dict]:
    """The primary tests of protocol.md §4, in its order."""
    fin = lambda st, m: values(runs, st, m)  # noqa: E731
    rows = []
    # PC
    for m in ("dppo-binary-tv", "grpo-clip-higher"):
        d = paired(values(runs, "control", m, "final"), values(runs, "control", m, "start"))
        h = paired(values(runs, "control", m, "eval_end.eval/accuracy"),
                   values(runs, "control", m, "eval_start.eval/accuracy"))
        ok = d is not None and h is not None and d["excludes_0"] == 1 and h["lo"] > -0.02
        rows.append(dict(claim="PC", test=f"{m} in control: Δ = final − start; held-out T=1 end − start",
                         ci=d, ci2=h, verdict="passes" if ok else ("not run" if d is None else "fails")))
    # claim 4
    a = paired(fin(MAIN, "dppo-binary-tv"), fin(MAIN, "pg-is"))
    c = paired(fin("control", "dppo-binary-tv"), fin("control", "pg-is"))
    inter = None
    if a is not None and c is not None:
        common = sorted(set(a["seeds"]) & set(c["seeds"]))
        d = [(fin(MAIN, "dppo-binary-tv")[s] - fin(MAIN, "pg-is")[s])
             - (fin("control", "dppo-binary-tv")[s] - fin("control", "pg-is")[s]) for s in common]
        if len(d) >= 2:
            inter = t_interval(d)
            inter["detectable"] = detectable(inter["sd"], len(d))
    v = "not run" if a is None or inter is None else (
        "reproduces" if a["excludes_0"] == 1 and inter["excludes_0"] == 1 else
        "contradicted" if a["excludes_0"] == -1 else "not shown" + (
            f" (could detect ≥ {a['detectable']:.3f})" if a["excludes_0"] == 0 else
            f" (the mismatch's share: could detect ≥ {inter['detectable']:.3f})"))
    rows.append(dict(claim="4", test=f"dppo-binary-tv − pg-is in {MAIN}; and its difference from control",
                     ci=a, ci2=inter, verdict=v))
    for m in ("pg-is", "cispo"):
        d = paired(fin(MAIN, m), fin("control", m))
        rows.append(dict(claim="4′", test=f"{m}: {MAIN} − control", ci=d, verdict=verdict(d, -1)))
    d = paired(fin(MAIN, "dppo-binary-kl"), fin(MAIN, "dppo-binary-kl-recompute"))
    rows.append(dict(claim="5", test=f"dppo-binary-kl − dppo-binary-kl-recompute in {MAIN}", ci=d,
                     verdict=verdict(d, +1)))
    d = paired(fin(MAIN, "minimal-negative-mask"), fin(MAIN, "pg-is"))
    mf = values(runs, MAIN, "minimal-negative-mask", "masked_frac_mean")
    v = verdict(d, +1)
    if v == "reproduces" and mf and sum(mf.values()) / len(mf) >= 0.005:
        v = "partly (it helps, but masks ≥ 0.5 %)"
    rows.append(dict(claim="6", test=f"minimal-negative-mask − pg-is in {MAIN}; masked fraction "
                     + (f"{100 * sum(mf.values()) / len(mf):.3f} %" if mf else "n/a"), ci=d, verdict=v))
    d = paired(fin(MAIN, "cispo"), fin(MAIN, "pg-is"))
    rows.append(dict(claim="7", test=f"cispo (C = 3) − pg-is in {MAIN}", ci=d, verdict=verdict(d, -1)))
    d = paired(fin(MAIN, "dppo-binary-tv"), fin(MAIN, "grpo-clip-higher"))
    rows.append(dict(claim="9a", test=f"dppo-binary-tv − grpo-clip-higher in {MAIN}", ci=d, verdict=verdict(d, +1)))
    a, b = fin(MAIN, "dppo-binary-tv"), fin(MAIN, "dppo-topk-tv")
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        dd = [a[s] - b[s] for s in common]
        eq = tost(dd, 0.05)
        ci = t_interval(dd)
        v = "reproduces (equivalent within ±0.05)" if eq["equivalent"] else (
            "contradicted" if ci["lo"] > 0.05 or ci["hi"] < -0.05 else "not shown (interval wider than ±0.05)")
        rows.append(dict(claim="9b", test=f"dppo-binary-tv − dppo-topk-tv in {MAIN}, TOST ±0.05", ci=ci,
                         ci2=dict(mean=ci["mean"], lo=eq["ci90"][0], hi=eq["ci90"][1], n=len(dd)), verdict=v))
    else:
        rows.append(dict(claim="9b", test="dppo-binary-tv − dppo-topk-tv", ci=None, verdict="not run"))
    # staleness
    s4 = paired(fin("bf16-lag4", "dppo-binary-tv"), fin("bf16-lag4", "pg-is"))
    s0 = paired(fin("bf16", "dppo-binary-tv"), fin("bf16", "pg-is"))
    inter = None
    if s4 is not None and s0 is not None:
        common = sorted(set(s4["seeds"]) & set(s0["seeds"]))
        d = [(fin("bf16-lag4", "dppo-binary-tv")[s] - fin("bf16-lag4", "pg-is")[s])
             - (fin("bf16", "dppo-binary-tv")[s] - fin("bf16", "pg-is")[s]) for s in common]
        if len(d) >= 2:
            inter = t_interval(d)
            inter["detectable"] = detectable(inter["sd"], len(d))
    rows.append(dict(claim="S", test="(dppo-binary-tv − pg-is) at lag 4 minus at lag 0", ci=inter,
                     verdict=verdict(inter, +1)))
    d = paired(fin("bf16-lag4", "ipo"), fin("bf16-lag4", "dppo-binary-tv"))
    rows.append(dict(claim="S′", test="ipo − dppo-binary-tv at lag 4", ci=d, verdict=verdict(d, +1)))
    return rows


def method_rows(runs, setting: str, methods: list[str], ref: str = "pg-is") -> list[dict]:
    out = []
    for m in methods:
        cell = runs.get((setting, m), {})
        if not cell:
            continue
        ss = [cell[s] for s in sorted(cell)]
        out.append(dict(
            method=m, n=len(ss), start=fmt_ms([s["start"] for s in ss]), final=fmt_ms([s["final"] for s in ss]),
            delta=fmt_ci(paired(values(runs, setting, m, "final"), values(runs, setting, m, "start"))),
            vs_ref=fmt_ci(paired(values(runs, setting, m), values(runs, setting, ref))) if m != ref else "—",
            heldout=fmt_ci(paired(values(runs, setting, m, "eval_end.eval/accuracy"),
                                  values(runs, setting, m, "eval_start.eval/accuracy"))),
            greedy_end=fmt_ms([s["eval_end"].get("eval/greedy_accuracy") for s in ss
                               if s["eval_end"].get("eval/greedy_accuracy") is not None]),
            collapsed=f"{sum(s['collapsed'] for s in ss)}/{len(ss)}",
            masked=f"{100 * sum(s['masked_frac_mean'] or 0 for s in ss) / len(ss):.2f} %",
            mismatch=f"{sum(s['mismatch_mean'] for s in ss) / len(ss):.4f} / {max(s['mismatch_max'] for s in ss):.4f}",
            ratio_max=f"{max(s['ratio_max'] or 0 for s in ss):.3g}"))
    return out


def md_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(str(r[k]) for k, _ in cols) + " |\n" for r in rows)


COLS = [("method", "method"), ("n", "seeds"), ("start", "start"), ("final", "final"),
        ("delta", "Δ = final − start [95 % CI]"), ("vs_ref", "− pg-is, same seed [95 % CI]"),
        ("heldout", "held-out T=1 end − start [95 % CI]"), ("greedy_end", "greedy held-out, end"),
        ("collapsed", "collapsed"), ("masked", "masked/clipped"), ("mismatch", "mismatch mean / max"),
        ("ratio_max", "max ratio")]


WHY = {"pc-8x8": "8 prompts × 8 (v2's batch: 4 mini-batches of 16)", "pc-lr3e-5": "lr 3e-5 (v2's)",
       "pc-exact": "exact warm-up (warmup_noise 0, v2's)"}


def why_rows(runs) -> list[dict]:
    """The `why` table (descriptive, seeds 0–3): DPPO-Binary-TV with one v2 choice put back into the control, and
    the control itself on the same seeds, paired by seed."""
    seeds = sorted({sd for w in WHY for sd in runs.get((w, "dppo-binary-tv"), {})})
    out = []
    for setting, label in [("control", "the positive control (32 × 8, lr 1e-4, warm-up noise 0.2)"), *WHY.items()]:
        v = lambda k: {sd: x for sd, x in values(runs, setting, "dppo-binary-tv", k).items() if sd in seeds}  # noqa
        ss = [x for sd, x in sorted(runs.get((setting, "dppo-binary-tv"), {}).items()) if sd in seeds]
        if not ss:
            continue
        ctrl = {sd: x for sd, x in values(runs, "control", "dppo-binary-tv").items() if sd in seeds}
        out.append(dict(
            setting=label, n=len(ss), start=fmt_ms([x["start"] for x in ss]), final=fmt_ms([x["final"] for x in ss]),
            delta=fmt_ci(paired(v("final"), v("start"))),
            heldout=fmt_ci(paired(v("eval_end.eval/accuracy"), v("eval_start.eval/accuracy"))),
            greedy=fmt_ms([x["eval_end"].get("eval/greedy_accuracy") for x in ss]),
            vs_control="—" if setting == "control" else fmt_ci(paired(v("final"), ctrl))))
    return out


def long_rows(runs) -> list[dict]:
    """The `long` table (descriptive): the mismatch with ≥ 100-token responses, against the ~26-token miniature."""
    out = []
    for setting in ("long-control", "long-bf16", "long-fp8"):
        for m in ("pg-is", "dppo-binary-tv"):
            cell = runs.get((setting, m), {})
            if not cell:
                continue
            ss = [cell[sd] for sd in sorted(cell)]
            lens = [x for s_ in ss for x in s_["series"]["response_len"] if x is not None]
            out.append(dict(setting=setting, method=m, n=len(ss), len=f"{sum(lens) / len(lens):.0f}" if lens else "—",
                            mismatch=f"{sum(x['mismatch_mean'] for x in ss) / len(ss):.4f} / "
                                     f"{max(x['mismatch_max'] for x in ss):.4f}",
                            start=fmt_ms([x["start"] for x in ss]), final=fmt_ms([x["final"] for x in ss]),
                            delta=fmt_ci(paired(values(runs, setting, m, "final"), values(runs, setting, m, "start"))),
                            collapsed=f"{sum(x['collapsed'] for x in ss)}/{len(ss)}"))
    return out


def staleness_rows(runs) -> list[dict]:
    out = []
    for m in STALE:
        row = dict(method=m)
        for st, k in LAGS.items():
            xs = list(values(runs, st, m).values())
            cell = runs.get((st, m), {})
            row[f"lag{k}"] = (fmt_ms(xs) + f" ({sum(s['collapsed'] for s in cell.values())}/{len(cell)})"
                              if xs else "n/a")
            if k:
                row[f"d{k}"] = fmt_ci(paired(values(runs, st, m), values(runs, "bf16", m)))
        out.append(row)
    return out


def figures(runs) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # the mismatch over training per method (the paper's Fig. 3), and the reward, in MAIN and in control
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for col, setting in enumerate((MAIN, "control")):
        for i, m in enumerate(SEC51 + ["minimal-negative-mask", "dppo-binary-kl-recompute"]):
            cell = runs.get((setting, m), {})
            style = dict(color=plt.cm.tab10(i % 10), ls="-" if i < 10 else "--")  # 12 methods: no colour reused alike
            if not cell:
                continue
            for row, key in enumerate(("reward", "mismatch/abs_diff_mean")):
                series = [s["series"][key] for s in cell.values()]
                n = min(len(x) for x in series)
                mean = [sum(x[i] for x in series) / len(series) for i in range(n)]
                axes[row, col].plot(range(1, n + 1), mean, label=m, lw=1.2, **style)
        axes[0, col].set_title(f"{setting}: training reward (mean over seeds)")
        axes[1, col].set_title(f"{setting}: pre-update mean |π − μ| (mean over seeds)")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("step")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = IMG / "evidence_sec51.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(str(p.relative_to(ROOT)))
    # staleness: final reward against the lag, per method, with 95 % intervals
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in STALE:
        xs, ys, lo, hi = [], [], [], []
        for st, k in LAGS.items():
            v = list(values(runs, st, m).values())
            if len(v) >= 2:
                ci = t_interval(v)
                xs.append(k), ys.append(ci["mean"]), lo.append(ci["mean"] - ci["lo"]), hi.append(ci["hi"] - ci["mean"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.set_xlabel("rollout lag k (steps)")
    ax.set_ylabel("final training reward (mean, 95 % CI)")
    ax.set_xticks(list(LAGS.values()))
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = IMG / "evidence_staleness.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(str(p.relative_to(ROOT)))
    return made


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="experiments/report_evidence.py")
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--no-figures", action="store_true")
    ns = ap.parse_args(argv)
    runs = load(parse_seeds(ns.seeds))
    machines = sorted({s["machine"] for cell in runs.values() for s in cell.values()})
    walls = [s["wall_s"] for cell in runs.values() for s in cell.values()]
    cl = claims(runs)
    out = [f"# Evidence v3: report (built by `python experiments/report_evidence.py --seeds {ns.seeds}`)\n",
           f"Main mismatch setting: `{MAIN}`. Runs: {len(walls)} ({sum(walls) / 3600:.1f} h of run time). "
           "Machines: " + "; ".join(machines) + "\n",
           "## Primary tests (experiments/protocol.md §4)\n",
           md_table([dict(claim=r["claim"], test=r["test"], ci=fmt_ci(r["ci"]), ci2=fmt_ci(r.get("ci2")),
                          verdict=r["verdict"]) for r in cl],
                    [("claim", "claim"), ("test", "test"), ("ci", "mean difference [95 % CI]"),
                     ("ci2", "second interval"), ("verdict", "verdict")]),
           f"\n## §5.1 in miniature: {MAIN}\n", md_table(method_rows(runs, MAIN, SEC51 + [
               "dppo-binary-kl-recompute", "minimal-negative-mask", "minimal-negative-mask@anchor=recompute"]), COLS),
           "\n## The matched control (fp32 engine, lag 0)\n", md_table(method_rows(runs, "control", CONTROL4), COLS),
           "\n## Staleness (bf16 engine; final reward mean ± SD (collapsed); lag k − lag 0, paired [95 % CI])\n",
           md_table(staleness_rows(runs), [("method", "method"), ("lag0", "lag 0"), ("lag1", "lag 1"),
                                           ("lag2", "lag 2"), ("lag4", "lag 4"), ("d1", "lag 1 − 0"),
                                           ("d2", "lag 2 − 0"), ("d4", "lag 4 − 0")]),
           "\n## Why the v2 miniature did not learn (DPPO-Binary-TV; one v2 choice at a time; descriptive)\n",
           md_table(why_rows(runs), [("setting", "setting"), ("n", "seeds"), ("start", "start"), ("final", "final"),
                                     ("delta", "Δ = final − start [95 % CI]"),
                                     ("vs_control", "− control, same seed [95 % CI]"),
                                     ("heldout", "held-out T=1 end − start [95 % CI]"),
                                     ("greedy", "greedy held-out, end")]),
           "\n## Long responses (12-digit addition written out; descriptive)\n",
           md_table(long_rows(runs), [("setting", "setting"), ("method", "method"), ("n", "seeds"),
                                      ("len", "mean response tokens"), ("mismatch", "mismatch mean / max"),
                                      ("start", "start"), ("final", "final"), ("delta", "Δ [95 % CI]"),
                                      ("collapsed", "collapsed")])]
    if not ns.no_figures:
        out.append("\n" + "\n".join(f"![]({'../../../' + p})" for p in figures(runs)) + "\n")
    dest = RESULTS / "report.md"
    dest.write_text("\n".join(out))
    (RESULTS / "report.json").write_text(json.dumps(dict(main=MAIN, seeds=ns.seeds, claims=cl, machines=machines),
                                                    indent=1, default=lambda o: None if isinstance(o, float) and
                                                    not math.isfinite(o) else o) + "\n")
    print(dest.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
