"""Fig. 2 in miniature (claims 1 and 10), on the shipped trainer: per-token ratio π/μ and |π−μ| against μ, and what
the library's real masks block.

μ = the trainer's bf16 rollout engine, sampling the first RL batch of the miniature (experiments/miniature.toml) with
its whole distribution recorded; π = the trainer's fp32 policy. Two conditions:

* **mismatch**: the same weights (the training–inference mismatch alone, as in the paper's Fig. 2);
* **after the step**: π after the trainer's own 4 mini-batch updates of that batch (PG-IS, so no mask shapes them):
  what a trust region meets at the end of a step.

Masks are the library's, on the batch's real advantages: GRPO-ClipHigher's ``ratio_mask`` (ε 0.2 / 0.28) and
DPPO-Binary-TV's ``dppo_mask`` (δ 0.15), counted per side (Â > 0 blocks a rise, Â < 0 a fall; Â = 0 never blocks).

    python experiments/fig2_mismatch.py [dppo train flags ...]      # ≈ 2 min on a busy 2-core CPU
    python experiments/fig2_mismatch.py --seeds 0-7 --batches 3 --tag v3-bf16 \
        --config experiments/positive_control.toml --rollout_dtype bf16          # pooled (docs/results.md v3)

``--seeds`` / ``--batches``: pool the tokens of the first B batches of each seed (each seed its own warm-up model; batch
b sampled after the b PG-IS steps before it, whose updates are the "after" condition of batch b − 1), so every
bucket's figures rest on as many tokens as the table's ``tokens`` column says. ``--tag`` names the outputs
(``experiments/results/fig2[_TAG].json``, ``docs/img/results_fig2[_TAG].png``).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from first_batch import ROOT, first_batch, make_trainer, update  # noqa: E402

from dppo.divergence import binary_tv  # noqa: E402
from dppo.rundir.machine import machine_info, machine_line  # noqa: E402
from dppo.trust_region import dppo_mask, ratio_mask  # noqa: E402

BUCKETS = [(0.0, 1e-3), (1e-3, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0001)]
EPS_LOW, EPS_HIGH, DELTA = 0.2, 0.28, 0.15


def _q(x: torch.Tensor, q: float) -> float | None:
    return float(x.quantile(q)) if x.numel() else None


def _frac(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def summarise(mu, pi, adv, ent, tok, names) -> dict:
    """Per μ bucket: |r−1| and |π−μ| quantiles, and the fraction of tokens each real mask blocks, per side."""
    lp, lmu = pi.log(), mu.log()
    clip = ratio_mask(lp, lmu, adv, EPS_LOW, EPS_HIGH) == 0
    tvm = dppo_mask(binary_tv(lp, lmu), lp, lmu, adv, DELTA, DELTA) == 0
    pos, neg = adv > 0, adv < 0
    r1, d = (pi / mu - 1).abs(), (pi - mu).abs()
    band = (pi / mu > 1 + EPS_HIGH) | (pi / mu < 1 - EPS_LOW)  # outside the clip band, whatever Â: the old count
    rows = []
    for lo, hi in BUCKETS:
        b = (mu >= lo) & (mu < hi)
        rows.append(dict(
            mu_bucket=f"[{lo:g}, {min(hi, 1):g})", tokens=int(b.sum()), adv_nonzero=_frac((adv != 0)[b]),
            adv_pos=_frac(pos[b]), adv_neg=_frac(neg[b]), r_median=_q((pi / mu)[b], 0.5),
            abs_r_minus_1_p50=_q(r1[b], 0.5), abs_r_minus_1_p99=_q(r1[b], 0.99),
            abs_diff_p50=_q(d[b], 0.5), abs_diff_p99=_q(d[b], 0.99), abs_diff_max=float(d[b].max()) if b.any() else None,
            outside_clip_band=_frac(band[b]), outside_tv_delta=_frac((d > DELTA)[b]),
            ratio_mask_pos=_frac((clip & pos)[b]), ratio_mask_neg=_frac((clip & neg)[b]),
            tv_mask_pos=_frac((tvm & pos)[b]), tv_mask_neg=_frac((tvm & neg)[b])))
    live = adv != 0
    total = Counter(tok.tolist())
    blocked = Counter(tok[clip].tolist())
    top = [dict(token=names[k], blocked=v, share_of_blocked=v / max(1, int(clip.sum())), block_rate=v / total[k],
                mean_mu=float(mu[clip & (tok == k)].mean()), mean_entropy=float(ent[clip & (tok == k)].mean()))
           for k, v in blocked.most_common(8)]
    return dict(tokens=int(mu.numel()), adv_nonzero=_frac(live),
                ratio_mask_frac=_frac(clip), tv_mask_frac=_frac(tvm),
                ratio_mask_frac_of_live=_frac(clip[live]), tv_mask_frac_of_live=_frac(tvm[live]),
                ratio_blocked_mean_mu=float(mu[clip].mean()) if clip.any() else None,
                tv_blocked_mean_mu=float(mu[tvm].mean()) if tvm.any() else None,
                live_mean_mu=float(mu[live].mean()) if live.any() else None,
                ratio_blocked_mean_entropy=float(ent[clip].mean()) if clip.any() else None,
                live_mean_entropy=float(ent[live].mean()) if live.any() else None,
                max_abs_diff=float(d.max()), max_abs_r_minus_1=float(r1.max()), buckets=rows,
                top_ratio_blocked_tokens=top)


def plot(tables: dict, summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 3, figsize=(15, 4.2 * len(tables)), squeeze=False)
    for row, (name, t) in enumerate(tables.items()):
        mu, pi, adv = t["mu"].numpy(), t["pi"].numpy(), t["adv"].numpy()
        col = ["C2" if a > 0 else "C3" if a < 0 else "0.6" for a in adv]
        ax = axes[row, 0]
        ax.scatter(mu, pi / mu, s=3, alpha=0.35, c=col)
        ax.axhline(1 + EPS_HIGH, color="r", lw=0.8, ls="--")
        ax.axhline(1 - EPS_LOW, color="r", lw=0.8, ls="--", label="clip band 0.8 / 1.28")
        ax.set_xscale("log")
        ax.set_xlabel("μ(a_t) (rollout engine)")
        ax.set_ylabel("π/μ")
        ax.set_title(f"{name}: ratio (green Â>0, red Â<0, grey Â=0)", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[row, 1]
        ax.scatter(mu, abs(pi - mu), s=3, alpha=0.35, c=col)
        ax.axhline(DELTA, color="r", lw=0.8, ls="--", label="TV δ = 0.15")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-5)
        ax.set_xlabel("μ(a_t)")
        ax.set_ylabel("|π − μ|")
        ax.set_title(f"{name}: Binary TV", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        ax = axes[row, 2]
        s = summaries[name]["buckets"]
        xs = list(range(len(s)))
        w = 0.2
        for j, (key, lab) in enumerate([("ratio_mask_pos", "ratio mask, Â>0"), ("ratio_mask_neg", "ratio mask, Â<0"),
                                         ("tv_mask_pos", "TV mask, Â>0"), ("tv_mask_neg", "TV mask, Â<0")]):
            ax.bar([x + (j - 1.5) * w for x in xs], [b[key] or 0 for b in s], w, label=lab)
        ax.set_xticks(xs, [f"{b['mu_bucket']}\nn={b['tokens']}" for b in s], fontsize=7)
        ax.set_ylabel("fraction of the bucket's tokens blocked")
        ax.set_title(f"{name}: blocked by the real masks", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _option(argv: list[str], name: str, default: str) -> tuple[str, list[str]]:
    if name in argv:
        i = argv.index(name)
        return argv[i + 1], argv[:i] + argv[i + 2:]
    return default, argv


def main(argv: list[str]) -> int:
    t0 = time.time()
    cmd = "python experiments/fig2_mismatch.py " + " ".join(argv)
    seeds, argv = _option(argv, "--seeds", "")
    batches, argv = _option(argv, "--batches", "1")
    tag, argv = _option(argv, "--tag", "")
    seed_list = [None] if not seeds else [int(x) for part in seeds.split(",") for x in (
        range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part else [part])]
    keys = ("mismatch (same weights)", "after the step's 4 PG-IS updates")
    parts: dict[str, list[dict]] = {k: [] for k in keys}
    rewards, models = [], []
    for seed in seed_list:
        tr = make_trainer(argv + ([] if seed is None else ["--seed", str(seed)]), "pg-is")
        models.append(tr.model_path)
        names = tr.tok.convert_ids_to_tokens(list(range(len(tr.tok))))
        for b in range(int(batches)):
            batch = first_batch(tr, step=b)
            ro, adv = batch["ro"], batch["adv"]
            m = ro.response_mask
            lmu_full = ro.rollout_full_logp
            ent = -(lmu_full.exp() * lmu_full).sum(-1)
            mu = ro.rollout_logp.exp()
            adv_tok = adv[:, None].expand_as(mu)
            pis = [tr.logp(ro).exp()]
            update(tr, batch, step=b)
            pis.append(tr.logp(ro).exp())
            for k, pi in zip(keys, pis):
                parts[k].append(dict(mu=mu[m], pi=pi[m], adv=adv_tok[m], ent=ent[m], tok=ro.response_ids[m]))
            rewards.append(float(batch["rewards"].mean()))
    tables = {k: {f: torch.cat([p[f] for p in ps]) for f in ("mu", "pi", "adv", "ent", "tok")}
              for k, ps in parts.items()}
    summaries = {k: summarise(t["mu"], t["pi"], t["adv"], t["ent"], t["tok"], names) for k, t in tables.items()}
    img = ROOT / "docs" / "img" / f"results_fig2{'_' + tag if tag else ''}.png"
    g = torch.Generator().manual_seed(0)
    shown = {}
    for k, t in tables.items():  # scatter: at most 20,000 points, the same rows of every field; the tables use all
        idx = torch.randperm(len(t["mu"]), generator=g)[:20000]
        shown[k] = {f: v[idx] for f, v in t.items()}
    plot(shown, summaries, img)
    cfg = tr.cfg
    res = dict(summaries=summaries, wall_s=time.time() - t0, machine=machine_line(machine_info()), command=cmd,
               models=models, seeds=seeds or str(cfg.seed), batches_per_seed=int(batches),
               rollouts=f"{cfg.rollout.prompts_per_step} prompts × {cfg.rollout.group_size} per batch",
               rollout_dtype=cfg.rollout.dtype, reward_mean=sum(rewards) / len(rewards), lr=cfg.optim.lr,
               image=str(img.relative_to(ROOT)), scatter_points=min(20000, len(tables[keys[0]]["mu"])))
    out = ROOT / "experiments" / "results" / f"fig2{'_' + tag if tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    for k, s in summaries.items():
        print(f"== {k}: {s['tokens']} tokens, Â≠0 {s['adv_nonzero']:.2f}; ratio mask {s['ratio_mask_frac']:.4f}, "
              f"TV mask {s['tv_mask_frac']:.4f}")
        for b in s["buckets"]:
            print("  ", json.dumps({kk: (round(v, 5) if isinstance(v, float) else v) for kk, v in b.items()}))
    print(f"{res['wall_s']:.0f} s on {res['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
