"""``dppo plot RUN_DIR``: the curves of a run as one PNG (reward and held-out accuracy, the paper's mismatch metrics
|π−μ| (Fig. 3), masked fractions by direction, entropy, response length, gradient norm, time per phase)."""

from __future__ import annotations

import os

from dppo.rundir import run_title
from dppo.rundir.metrics_log import read_metrics

__all__ = ["plot_run"]

PANELS = [
    ("reward / accuracy", [("reward", "train reward"), ("eval/accuracy", "held-out Avg@k"),
                           ("eval/greedy_accuracy", "held-out greedy")]),
    ("mean |π−μ| (Fig. 3)", [("loss/abs_diff_mean", "all updates"),
                             ("mismatch/abs_diff_mean", "before the first update")]),
    ("max / min (π−μ) (Fig. 3)", [("loss/diff_max", "max"), ("loss/diff_min", "min")]),
    ("masked fraction", [("loss/masked_frac_pos", "Â>0, π↑"), ("loss/masked_frac_neg", "Â<0, π↓")]),
    ("entropy", [("entropy", "entropy (nats)")]),
    ("response length", [("response_len", "tokens")]),
    ("grad norm / ratio max", [("grad_norm", "grad norm"), ("loss/ratio_max", "max π/μ")]),
    ("seconds per step", [("time/rollout", "rollout"), ("time/train", "train"), ("time/recompute", "recompute")]),
]


def plot_run(run_dir: str, out: str | None = None) -> str:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(path)
    if not rows:
        raise FileNotFoundError(f"{path} is missing or empty; is {run_dir!r} a run directory of `dppo train`?")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = run_title(run_dir)
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for ax, (name, series) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "o-" if key.startswith("eval/") else "-"
            ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1.2)
            drawn = True
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
