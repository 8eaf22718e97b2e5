"""Fig. 2 in miniature (claims 1 and 10): per-token ratio π/μ and |π−μ| against μ.

μ = the bf16 copy of the SFT warm-up model (the "inference engine"), which samples the rollouts; π = the same weights
in fp32 (the "trainer"). Panel row 1: that pure precision mismatch. Panel row 2: the same rollouts after one batch of
4 optimizer steps (PG-IS, Adam lr 2e-4) — what a ratio clip actually meets during training. For each, the fraction of
tokens a ratio clip (r > 1.28 or r < 0.8; GRPO-ClipHigher) and a Binary-TV mask (|π−μ| > 0.15; DPPO) would block, by
μ bucket, and which tokens the ratio clip blocks most.

    python experiments/fig2_mismatch.py          # ≈ 1 min on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import minilab as ml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = [(0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0001)]
EPS_LOW, EPS_HIGH, DELTA = 0.2, 0.28, 0.15


def token_table(model, ro, update_steps: int = 0, lr: float = 2e-4):
    """Per response token: μ, π, entropy(μ), token id, for π = ``model`` after ``update_steps`` PG-IS steps."""
    if update_steps:
        pi_model = ml.pg_is_updated(model, ro, lr, update_steps, seed=0)
    else:
        pi_model = ml.cast_copy(model, torch.float32)
    with torch.no_grad():
        lg = ml.response_logits(pi_model, ro)
        logp = torch.log_softmax(lg, -1).gather(-1, ro.response[..., None]).squeeze(-1)
        lmu_full = torch.log_softmax(ro.rollout_logits, -1)
        ent = -(lmu_full.exp() * lmu_full).sum(-1)
    m = ro.response_mask
    return dict(mu=ro.rollout_logp.exp()[m], pi=logp.exp()[m], ent=ent[m], tok=ro.response[m])


def summarise(t: dict) -> dict:
    mu, pi, tok, ent = t["mu"], t["pi"], t["tok"], t["ent"]
    r = pi / mu
    tv = (pi - mu).abs()
    clip_hi, clip_lo = r > 1 + EPS_HIGH, r < 1 - EPS_LOW
    clip = clip_hi | clip_lo
    tvm = tv > DELTA
    rows = []
    for lo, hi in BUCKETS:
        b = (mu >= lo) & (mu < hi)
        n = int(b.sum())
        rows.append(dict(mu_bucket=f"[{lo:g}, {min(hi, 1):g})", tokens=n,
                         ratio_clip_frac=float(clip[b].float().mean()) if n else None,
                         ratio_clip_high_frac=float(clip_hi[b].float().mean()) if n else None,
                         ratio_clip_low_frac=float(clip_lo[b].float().mean()) if n else None,
                         tv_mask_frac=float(tvm[b].float().mean()) if n else None,
                         abs_ratio_minus_1_p99=float((r[b] - 1).abs().quantile(0.99)) if n else None,
                         abs_diff_p99=float(tv[b].quantile(0.99)) if n else None))
    total = Counter(tok.tolist())
    clipped = Counter(tok[clip].tolist())
    top = [dict(token=ml.token_str(k), clipped=v, share_of_clipped=v / max(1, int(clip.sum())),
                clip_rate=v / total[k], mean_mu=float(mu[clip & (tok == k)].mean()),
                mean_entropy=float(ent[clip & (tok == k)].mean()))
           for k, v in clipped.most_common(8)]
    return dict(tokens=int(mu.numel()), ratio_clip_frac=float(clip.float().mean()), tv_mask_frac=float(tvm.float().mean()),
                clipped_mean_mu=float(mu[clip].mean()) if clip.any() else None,
                all_mean_mu=float(mu.mean()),
                clipped_mean_entropy=float(ent[clip].mean()) if clip.any() else None,
                all_mean_entropy=float(ent.mean()),
                max_abs_diff=float(tv.max()), max_abs_ratio_minus_1=float((r - 1).abs().max()),
                buckets=rows, top_clipped_tokens=top)


def plot(tables: dict, summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 3, figsize=(15, 4.2 * len(tables)))
    for row, (name, t) in enumerate(tables.items()):
        mu, pi = t["mu"].numpy(), t["pi"].numpy()
        ax = axes[row, 0]
        ax.scatter(mu, pi / mu, s=3, alpha=0.3)
        ax.axhline(1 + EPS_HIGH, color="r", lw=0.8, ls="--")
        ax.axhline(1 - EPS_LOW, color="r", lw=0.8, ls="--", label="ratio clip 0.8 / 1.28")
        ax.set_xscale("log")
        ax.set_xlabel("μ(a_t) (bf16 rollout)")
        ax.set_ylabel("π/μ")
        ax.set_title(f"{name}: ratio")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[row, 1]
        ax.scatter(mu, abs(pi - mu), s=3, alpha=0.3, color="C1")
        ax.axhline(DELTA, color="r", lw=0.8, ls="--", label="TV mask δ = 0.15")
        ax.set_xscale("log")
        ax.set_xlabel("μ(a_t)")
        ax.set_ylabel("|π − μ|")
        ax.set_title(f"{name}: Binary TV")
        ax.legend(loc="upper left", fontsize=8)
        ax = axes[row, 2]
        s = summaries[name]["buckets"]
        xs = range(len(s))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], [b["ratio_clip_frac"] or 0 for b in s], w, label="ratio clip would block")
        ax.bar([x + w / 2 for x in xs], [b["tv_mask_frac"] or 0 for b in s], w, label="TV mask would block")
        ax.set_xticks(list(xs), [f"{b['mu_bucket']}\nn={b['tokens']}" for b in s], fontsize=7)
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"{name}: blocked, by μ bucket")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ml.sft_model(400)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    probs = ml.problems(256, 4242)
    ro = ml.rollout(ml.cast_copy(model, torch.bfloat16), probs, 8, generator=gen)
    tables = {
        "bf16 vs fp32, same weights": token_table(model, ro, 0),
        "bf16 rollout vs fp32 after 4 PG-IS steps": token_table(model, ro, 4),
    }
    summaries = {k: summarise(v) for k, v in tables.items()}
    img = ROOT / "docs" / "img" / "results_fig2.png"
    plot(tables, summaries, img)
    res = dict(summaries=summaries, wall_s=time.time() - t0, command="python experiments/fig2_mismatch.py",
               model="minilab SFT warm-up (400 steps), Qwen3 H64 L2 V512", rollouts=f"{len(probs)} prompts × 8",
               image=str(img.relative_to(ROOT)))
    out = ROOT / "experiments" / "results" / "fig2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
